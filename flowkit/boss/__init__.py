"""BOSS: Bellman optimal step sizes (Nguyen et al., "Bellman Optimal Step-size Straightening
of Flow-Matching Models", ICLR 2024).

- `cost`: fine Euler trajectories and the local / end-point cost matrices;
- `dp`: the exact K-step dynamic program over the fine grid;
- `table`: stored step sizes (`BossTable`), the cache and the shipped tables;
- `search`: a direct search of a grid on the final error (flowkit's variant);
- `tuning`: computing a table for a model (what `flowkit tune boss` and the `boss` sampler run).
"""

from flowkit.boss.cost import (
    COST_KINDS,
    Problem,
    Trajectories,
    endpoint_cost,
    fingerprint,
    local_cost,
)
from flowkit.boss.dp import best_path, path_cost
from flowkit.boss.search import final_error, search_final
from flowkit.boss.table import (
    BossTable,
    cache_root,
    find_table,
    load_table,
    resolve_table,
    shipped_root,
)
from flowkit.boss.tuning import (
    AUTO_PROMPTS,
    TUNE_SEED,
    auto_problem,
    fine_grid,
    model_fingerprint,
    tune_table,
)

__all__ = [
    "AUTO_PROMPTS", "BossTable", "COST_KINDS", "Problem", "TUNE_SEED", "Trajectories", "auto_problem", "best_path",
    "cache_root", "endpoint_cost", "find_table", "final_error", "fine_grid", "fingerprint", "load_table", "local_cost",
    "model_fingerprint", "path_cost", "resolve_table", "search_final", "shipped_root", "tune_table",
]
