"""alignprop: reward backpropagation (AlignProp / DRaFT) on the shapes model.

The claim of Prabhudesai et al. ("Aligning Text-to-Image Diffusion Models with Reward
Backpropagation") and Clark et al. (DRaFT): fine-tuning a LoRA by backpropagating a
differentiable reward through the last steps of the sampling chain raises the reward, also
on prompts it was not trained on, in few steps; randomised truncation does at least as well
as DRaFT-1; checkpointing keeps the memory flat in the number of differentiated steps.

Here `flowkit.finetune` trains a rank-4 LoRA of the shapes model for 200 steps (batch 4, 10
Euler steps under CFG 4, the official randomised truncation, checkpointed) on the shipped
counter's reward (`count`) over 32 of the 48 two-group captions (`split_prompts`: the other
16 are held out). The LoRA of steps 0 (the base model), 50, 100 and 200 then samples the
held-out captions (n = 128 each, the same prompts and seeds at every step, so the rows are
paired): the held-out count reward higher than the base model's; whole caption, from the
exact evaluator (never the training reward: the counter separates right from wrong captions
with AUC 0.95-0.999, so it must not score itself), higher; FSD within 5% of the base model's
(the reward-hacking guard). A second fine-tune with K = 1 (DRaFT-1) at step 200: randomised
truncation no worse. Memory: the bytes autograd saves for one training batch at K = 1, 2, 3
with and without checkpointing. The curve of reward against fine-tune steps is recorded for
the docs and the gallery (`flowkit.gallery.curve`). Fine-tunes are cached (resumably) under
the bench cache; --quick fine-tunes the random tiny model for 4 steps.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from flowkit.bench.core import BenchRun, column, experiment
from flowkit.bench.experiments._shapes_guidance import ShapesBench
from flowkit.bench.verdict import Claim

SCALE = 4.0
REWARD = "count"
HELD_OUT = 16
VERSION = 1
FSD_WITHIN = Claim("no_worse", margin=0.05, relative=True, better="lower")
NO_WORSE_REWARD = Claim("no_worse", margin=0.05, relative=True, better="higher")
NO_WORSE_POINTS = Claim("no_worse", margin=2.0, better="higher")
MiB = 2.0 ** 20


def _plan(bench: BenchRun) -> dict[str, Any]:
    return {"steps": bench.n(full=200, quick=4), "eval_steps": (0, 50, 100, 200) if not bench.quick else (0, 2, 4),
            "ckpt_every": bench.n(full=50, quick=2), "batch": bench.n(full=4, quick=2),
            "sample_steps": bench.n(full=10, quick=4), "n": bench.sample_count(full=128, quick=8)}


def finetuned(bench: BenchRun, model: str, fingerprint: str, plan: dict[str, Any], train: list[str],
              truncation: str, k: int = 1) -> tuple[dict[int, Path], list[dict[str, Any]], str]:
    """The fine-tune's LoRA folder at each evaluated step (trained once, resumably, under the
    bench cache), its per-step history, and its cache label."""
    import torch

    import flowkit
    from flowkit.bench.cache import config_hash, hold_claim
    from flowkit.finetune import CHECKPOINT_FILE

    settings = {"model": fingerprint, "reward": REWARD, "prompts": train, "steps": plan["steps"],
                "batch": plan["batch"], "sample_steps": plan["sample_steps"], "scale": SCALE,
                "truncation": truncation, "k": k, "seed": bench.seed, "version": VERSION}
    label = f"{truncation}{k if truncation == 'fixed' else ''}-{config_hash(settings)[:12]}"
    out = Path(bench.cache.root) / "alignprop" / "finetune" / label
    with hold_claim(out):
        ckpt = out / CHECKPOINT_FILE
        done = torch.load(ckpt, map_location="cpu", weights_only=True)["step"] if ckpt.is_file() else 0
        if done < plan["steps"]:
            flowkit.finetune(flowkit.load(model), reward=REWARD, prompts=train, steps=plan["steps"],
                             batch_size=plan["batch"], sample_steps=plan["sample_steps"],
                             guidance=f"cfg:scale={SCALE}", truncation=truncation, k=k, checkpoint=True,
                             ckpt_every=plan["ckpt_every"], out_dir=out, seed=bench.seed, progress=False)
        history = torch.load(ckpt, map_location="cpu", weights_only=True)["history"]
    folders = {s: out / "checkpoints" / f"step-{s:06d}" for s in plan["eval_steps"] if s > 0}
    return folders, history, label


def _arm_fn(shapes: ShapesBench, model: str, lora: Path | None, held: list[tuple[str, Any]], sample_steps: int):
    """The chunk function of the held-out arm of one LoRA (None: the base model), loading the
    model only when the cache misses."""
    from flowkit.bench.shapes_world import shapes_arm

    def run(indices: list[int]) -> list[dict[str, Any]]:
        import flowkit
        from flowkit.finetune import load_lora

        pipe = flowkit.load(model)
        if lora is not None:
            load_lora(pipe, lora)
        fn = shapes_arm(pipe, held, seed=shapes.bench.seed, guidance=f"cfg:scale={SCALE}", steps=sample_steps,
                        size=shapes.size, rewards=(REWARD, "presence"))
        return fn(indices)

    return run


def memory(model: str, train: list[str], plan: dict[str, Any], seed: int) -> dict[str, Any]:
    """Saved-activation MiB of one training batch at K = 1, 2, 3, with and without
    checkpointing, and the seconds of one training step (forward and backward) at K = 2."""
    import torch

    import flowkit
    from flowkit.finetune import add_lora, lora_parameters, reward_loss, saved_activation_bytes
    from flowkit.seeding import generators_for

    pipe = flowkit.load(model)
    add_lora(pipe)
    rows = [train[i % len(train)] for i in range(plan["batch"])]
    kw = dict(steps=plan["sample_steps"], guidance=f"cfg:scale={SCALE}")
    out: dict[str, Any] = {"K": [1, 2, 3], "batch": plan["batch"]}
    for checkpoint in (True, False):
        key = "checkpointed_MiB" if checkpoint else "not_checkpointed_MiB"
        out[key] = [round(saved_activation_bytes(pipe, REWARD, rows, generators_for(seed, range(len(rows))),
                                                 grad_steps=k, checkpoint=checkpoint, **kw) / MiB, 3)
                    for k in out["K"]]
        params = list(lora_parameters(pipe).values())
        t0 = time.perf_counter()
        loss, _ = reward_loss(pipe, REWARD, rows, generators_for(seed, range(len(rows))), grad_steps=2,
                              checkpoint=checkpoint, **kw)
        torch.autograd.grad(loss, params)
        out[("checkpointed" if checkpoint else "not_checkpointed") + "_step_seconds"] = \
            round(time.perf_counter() - t0, 3)
    full = out["not_checkpointed_MiB"]
    out["not_checkpointed_MiB_per_row_per_step"] = round((full[2] - full[0]) / 2 / plan["batch"], 3)
    return out


@experiment("alignprop", "AlignProp / DRaFT: a LoRA fine-tuned on the counter's reward through the sampling chain, "
                         "scored on held-out two-group captions: reward, whole caption, FSD, truncation, memory")
def alignprop(bench: BenchRun) -> None:
    from flowkit.bench.shapes_world import metric_columns, model_spec
    from flowkit.gallery import curve
    from flowkit.train.alignprop import split_prompts
    from flowkit.worlds.shapes_eval import prompt_set

    plan = _plan(bench)
    train, held_texts = split_prompts("two", HELD_OUT)
    held = [item for item in prompt_set("two") if item[0] in set(held_texts)]
    shapes = ShapesBench(bench, held, steps=plan["sample_steps"], quick_steps=plan["sample_steps"])
    model = model_spec(tiny=bench.quick)
    fingerprint = shapes.base["model"]
    runs = {"random": finetuned(bench, model, fingerprint, plan, train, "random"),
            "K=1": finetuned(bench, model, fingerprint, plan, train, "fixed", 1)}

    def arm(name: str, lora: Path | None, label: str) -> list[dict[str, Any]]:
        config = {**shapes.base, "guidance": f"cfg:scale={SCALE}", "lora": label, "rewards": [REWARD, "presence"],
                  "alignprop_version": VERSION}
        results = bench.arm(name, config, _arm_fn(shapes, model, lora, held, plan["sample_steps"]), n=plan["n"])
        bench.samples[name] = [{k: v for k, v in r.items() if "features" not in k} for r in results]
        return results

    base = arm("base", None, "none")
    folders, history, label = runs["random"]
    last = plan["eval_steps"][-1]
    arms = {0: base}
    for s in plan["eval_steps"][1:]:
        arms[s] = arm(f"alignprop-step{s}", folders[s], f"{label}/step{s}")
    reward_key = f"reward_{REWARD}"
    for s in plan["eval_steps"][1:]:
        method = f"AlignProp, step {s}"
        bench.compare(method, f"held-out {REWARD} reward", claim=Claim("higher"),
                      treatment=column(arms[s], reward_key), baseline=column(base, reward_key),
                      baseline_name="base model", notes="the training reward, on captions it was not trained on")
        shapes.rate_row(method, "whole caption", "whole_caption", arms[s], base, Claim("higher"), "base model")
        shapes.fsd_row(method, arms[s], base, FSD_WITHIN, "base model")

    k1_folders, k1_history, k1_label = runs["K=1"]
    k1 = arm(f"draft1-step{last}", k1_folders[last], f"{k1_label}/step{last}")
    method = f"randomised truncation, step {last}"
    bench.compare(method, f"held-out {REWARD} reward", claim=NO_WORSE_REWARD, treatment=column(arms[last], reward_key),
                  baseline=column(k1, reward_key), baseline_name="K = 1 (DRaFT-1)")
    shapes.rate_row(method, "whole caption", "whole_caption", arms[last], k1, NO_WORSE_POINTS, "K = 1 (DRaFT-1)")

    mem = memory(model, train, plan, bench.seed)
    ratio = mem["checkpointed_MiB"][1] / mem["not_checkpointed_MiB"][1]
    bench.measure("checkpointing", "saved activations, checkpointed / not (K = 2)", [ratio],
                  Claim("at_most", target=0.1),
                  notes=f"{mem['checkpointed_MiB'][1]:.1f} MiB vs {mem['not_checkpointed_MiB'][1]:.1f} MiB "
                        f"for a batch of {mem['batch']}; one measurement")

    steps = list(plan["eval_steps"])
    held_reward = [float(column(arms[s], reward_key).mean()) for s in steps]
    whole = [float(np.nanmean(metric_columns(arms[s], "whole_caption"))) for s in steps]
    window = max(1, plan["steps"] // 20)
    train_x = [h["step"] + 1 for h in history][window - 1::window]
    train_y = [float(np.mean([h["reward"] for h in history][i + 1 - window:i + 1]))
               for i in range(window - 1, len(history), window)]
    curve(bench, "AlignProp: reward against fine-tune steps", x_label="fine-tune step",
          series={f"held-out {REWARD} reward": (steps, held_reward),
                  f"training batches' {REWARD} reward (mean of {window})": (train_x, train_y)})
    curve(bench, "AlignProp: whole caption on held-out captions", x_label="fine-tune step",
          series={"whole caption (%)": (steps, whole)})
    bench.info.update({
        "finetune": {"steps": plan["steps"], "batch": plan["batch"], "sample_steps": plan["sample_steps"],
                     "cfg_scale": SCALE, "reward": REWARD, "rank": 4, "lr": 1e-3, "weight_decay": 1e-4,
                     "grad_clip": 1.0, "truncation": "random (official: t ~ N(0.84 N, 0.1 N)), and K = 1",
                     "seconds_per_step": round(float(np.mean([h["seconds"] for h in history])), 3),
                     "mean_K": round(float(np.mean([h["K"] for h in history])), 3),
                     "cache": {"random": label, "K=1": k1_label}},
        "split": {"training": train, "held_out": held_texts},
        "n": plan["n"], "eval_steps": steps, "memory": mem,
        "held_out_reward_by_step": dict(zip(map(str, steps), held_reward)),
        "whole_caption_by_step": dict(zip(map(str, steps), whole)),
        "training_reward_K1_last": float(np.mean([h["reward"] for h in k1_history][-window:])),
    })
