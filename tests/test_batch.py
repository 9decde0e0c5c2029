"""`flowkit batch` in one process: prompt files, seeds, micro-batches, out-of-memory, resume rules.

The tiny model is loaded once for the module (memoised `flowkit.load`, as in test_cli) and
every run is 16 px with two steps.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from PIL import Image

import flowkit.api
import flowkit.loading
from flowkit.batch.microbatch import is_out_of_memory
from flowkit.batch.prompts import COLUMNS, parse_prompt_lines
from flowkit.cli import main
from flowkit.errors import FlowkitError
from flowkit.seeding import seed_for
import tiny_pipes

SMALL = ["--model", "tiny", "--steps", "2", "--height", "16", "--width", "16"]


@pytest.fixture(scope="module")
def loads():
    with tiny_pipes.memoised_load() as patched:
        yield patched


def batch(argv, capsys, *, as_json=True):
    code = main(["batch", *map(str, argv), *(["--json"] if as_json else [])])
    out, err = capsys.readouterr()
    summary = json.loads(out) if (as_json and code == 0) else None
    return code, summary, err


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# --------------------------------------------------------------------------- prompt files


def test_three_formats_parse_with_line_numbers_and_stable_indices():
    txt = parse_prompt_lines(b"\xef\xbb\xbfa red circle\n\n  two blue squares  \r\n", ".txt")
    assert [(i.index, i.line, i.prompt) for i in txt.items] == [(0, 1, "a red circle"), (1, 3, "two blue squares")]

    jsonl = parse_prompt_lines(
        b'{"prompt": "a", "seed": 3, "sampler": "heun", "guidance": "cfg:scale=5 + adaptive:gamma=0.99",'
        b' "steps": 4, "size": "16x32", "negative_prompt": "blurry"}\n'
        b'{"prompt": "b", "guidance": [{"name": "cfg", "params": {"scale": 2}}], "size": [16, 16]}\n'
        b'{"prompt": "c", "steps": 0}\n{"prompt": "d", "guidance": "none", "seed": null}\n', ".jsonl")
    a, b, d = jsonl.items
    assert (a.seed, a.sampler, a.steps, a.size, a.negative_prompt) == (3, "heun", 4, (16, 32), "blurry")
    assert a.guidance == "cfg:scale=5+adaptive:gamma=0.99"
    assert (b.guidance, b.size, b.seed) == ("cfg:scale=2", (16, 16), None)
    assert (d.index, d.line, d.guidance, d.seed) == (3, 4, "none", None)
    [err] = jsonl.errors
    assert (err.index, err.line) == (2, 3) and "steps must be an integer from 1" in err.message

    csv = parse_prompt_lines(b'prompt,seed,size\n"a, b",,32\n\nc,x,\nd,1\n', ".csv")
    assert [(i.index, i.line, i.prompt, i.seed, i.size) for i in csv.items] == [(0, 2, "a, b", None, (32, 32))]
    assert [(e.index, e.line) for e in csv.errors] == [(1, 4), (2, 5)]
    assert "seed" in csv.errors[0].message and "2 cells for 3 columns" in csv.errors[1].message


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a", "sampler": "eulr"}', ["sampler", "euler"]),
    ('{"prompt": "a", "guidance": "cfg:scal=3"}', ["guidance", "scale"]),
    ('{"prompt": "a", "stepz": 3}', ["stepz", "steps"]),
    ('{"prompt": 3}', ["prompt must be a string"]),
    ('["a"]', ["JSON object"]),
    ('{"prompt": "a", "size": "16by16"}', ["size"]),
    ('{"prompt": "a", "seed": -1}', ["seed"]),
    ('{"prompt": "a"', ["not valid JSON"]),
    ('{"seed": 1}', ['no "prompt"']),
])
def test_malformed_jsonl_lines_say_what_is_wrong(line, words):
    parsed = parse_prompt_lines(f'{{"prompt": "fine"}}\n{line}\n'.encode(), ".jsonl")
    assert len(parsed.items) == 1
    [err] = parsed.errors
    assert err.line == 2 and all(w in err.message for w in words), err.message


def test_bad_csv_header_is_an_error_naming_the_column():
    with pytest.raises(FlowkitError, match=r"line 2: unknown CSV column 'promt' \(did you mean 'prompt'\?\)"):
        parse_prompt_lines(b"\npromt,seed\na,1\n", ".csv")


# every line of any text parses or is reported with its number; nothing else escapes
_json_value = st.recursive(st.none() | st.booleans() | st.integers(-5, 2**70) | st.floats(allow_nan=False)
                           | st.text(max_size=12), lambda c: st.lists(c, max_size=3)
                           | st.dictionaries(st.text(max_size=5), c, max_size=3), max_leaves=6)
_field = st.sampled_from([*COLUMNS, "stepz", "n"])
_spec_text = st.sampled_from(["euler", "heun", "cfg:scale=3", "none", "cfg:scale=", "apg+cfg", "x:y=[1;2]", ""])
_obj = st.dictionaries(_field, _json_value | _spec_text, max_size=5)
_jsonl_line = st.one_of(_obj.map(json.dumps), st.text(max_size=30),
                        _obj.map(lambda d: json.dumps({"prompt": "p", **d})))
_csv_line = st.lists(st.text(alphabet=st.characters(codec="utf-8"), max_size=8) | _spec_text, max_size=5).map(",".join)


def _blank(raw: bytes) -> bool:
    try:
        return not raw.rstrip(b"\r").decode("utf-8").strip()
    except UnicodeDecodeError:
        return False


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from([".txt", ".jsonl", ".csv"]), lines=st.lists(st.one_of(_jsonl_line, _csv_line,
       st.binary(max_size=12).map(lambda b: b.decode("latin-1"))), max_size=8), raw=st.binary(max_size=16))
def test_fuzz_every_line_parses_or_is_reported(fmt, lines, raw):
    data = ("prompt,seed,sampler,guidance\n" if fmt == ".csv" else "").encode() + \
        "\n".join(lines).encode("utf-8", "surrogatepass") + b"\n" + raw
    try:
        parsed = parse_prompt_lines(data, fmt)
    except FlowkitError:
        return
    body = data[3:] if data.startswith(b"\xef\xbb\xbf") else data
    expected = [n for n, raw in enumerate(body.split(b"\n"), start=1) if not _blank(raw)]
    if fmt == ".csv":
        expected = expected[1:]  # the header
    assert sorted([i.line for i in parsed.items] + [e.line for e in parsed.errors]) == expected
    indices = sorted([i.index for i in parsed.items] + [e.index for e in parsed.errors])
    assert indices == list(range(len(indices)))


# --------------------------------------------------------------------------- seeds, micro-batches


def test_items_are_the_images_of_flowkit_generate(loads, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle"}\n{"prompt": "two blue squares"}\n'
                       '{"prompt": "one green triangle", "seed": 7, "negative_prompt": "red"}\n')
    code, summary, err = batch([prompts, "--out", tmp_path / "out", *SMALL, "--seed", "5", "--batch-size", "1"],
                               capsys)
    assert code == 0, err
    assert summary["generated"] == [0, 1, 2] and summary["nfe"] == 12
    recs = records(tmp_path / "out")
    assert [r["noise_seed"] for r in recs] == [seed_for(5, 0), seed_for(5, 1), seed_for(7, 0)]

    gen = tmp_path / "gen"
    assert main(["generate", "a red circle", "two blue squares", *SMALL, "--seed", "5", "--out", str(gen)]) == 0
    assert main(["generate", "one green triangle", *SMALL, "--seed", "7", "--negative-prompt", "red",
                 "--out", str(tmp_path / "one.png")]) == 0
    capsys.readouterr()
    # item 2 alone, like generate's single image: the same bytes; items 0 and 1 were a batch of 2 in generate
    assert (tmp_path / "out" / recs[2]["file"]).read_bytes() == (tmp_path / "one.png").read_bytes()
    for rec, name in zip(recs, ["00000-a-red-circle.png", "00001-two-blue-squares.png"]):
        assert np.abs(pixels(tmp_path / "out" / rec["file"]) - pixels(gen / name)).max() <= 1
    other = tmp_path / "other.png"
    assert main(["generate", "one green triangle", *SMALL, "--seed", "8", "--out", str(other)]) == 0
    assert np.abs(pixels(other) - pixels(tmp_path / "one.png")).max() > 10  # negative control: another seed


def _noise_recorder(monkeypatch):
    """Record each image's initial noise, by its generator's seed, as flowkit.sample draws it."""
    drawn: dict[int, torch.Tensor] = {}
    real = flowkit.api.randn_per_sample

    def record(shape, generators, *args, **kwargs):
        seeds = [g.initial_seed() for g in generators]
        noise = real(shape, generators, *args, **kwargs)
        for s, row in zip(seeds, noise):
            assert s not in drawn, "an image was sampled twice"
            drawn[s] = row.clone()
        return noise

    monkeypatch.setattr(flowkit.api, "randn_per_sample", record)
    return drawn


def test_batch_sizes_1_4_16_same_noise_and_pixels(loads, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{n} red circles\n" for n in range(16)))
    runs = {}
    for size in (1, 4, 16):
        with monkeypatch.context() as m:
            noise = _noise_recorder(m)
            code, summary, err = batch([prompts, "--out", tmp_path / f"b{size}", *SMALL, "--batch-size", size], capsys)
        assert code == 0, err
        recs = records(tmp_path / f"b{size}")
        assert {r["batch_size"] for r in recs} == {size}
        runs[size] = (noise, {r["index"]: pixels(tmp_path / f"b{size}" / r["file"]) for r in recs})
    noise1, pix1 = runs[1]
    assert len(noise1) == 16
    for size in (4, 16):
        noise, pix = runs[size]
        assert noise.keys() == noise1.keys() and all(torch.equal(noise[s], noise1[s]) for s in noise1)
        assert pix.keys() == pix1.keys() and max(np.abs(pix[i] - pix1[i]).max() for i in pix1) <= 1
    assert np.abs(pix1[0] - pix1[1]).max() > 10  # negative control: other items differ


def test_out_of_memory_halves_the_batch_and_goes_on(loads, tmp_path, capsys, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{n} blue squares\n" for n in range(6)))
    assert batch([prompts, "--out", tmp_path / "ref", *SMALL, "--batch-size", "1"], capsys)[0] == 0
    unet = loads("tiny").unet
    real_forward = unet.forward
    rows_seen = []

    def fake(sample, *args, **kwargs):  # a device that fits 4 rows (2 images with CFG) per forward pass
        rows_seen.append(sample.shape[0])
        if sample.shape[0] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected)")
        return real_forward(sample, *args, **kwargs)

    monkeypatch.setattr(unet, "forward", fake)
    code, summary, err = batch([prompts, "--out", tmp_path / "oom", *SMALL, "--batch-size", "6"], capsys)
    assert code == 0, err
    assert "out of memory at batch size 6; going on at 3" in err and "at batch size 3; going on at 2" in err
    assert summary["generated"] == list(range(6))
    recs, ref = records(tmp_path / "oom"), records(tmp_path / "ref")
    assert [r["batch_size"] for r in recs] == [2] * 6 and max(rows_seen) == 12
    for r, q in zip(recs, ref):
        assert np.abs(pixels(tmp_path / "oom" / r["file"]) - pixels(tmp_path / "ref" / q["file"])).max() <= 1

    monkeypatch.setattr(unet, "forward", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("injected")))
    code, _, err = batch([prompts, "--out", tmp_path / "none", *SMALL, "--batch-size", "2"], capsys)
    assert code == 2 and "out of memory sampling one 16x16 image (line 1)" in err


def test_out_of_memory_is_recognised_on_cpu_and_cuda():
    assert is_out_of_memory(torch.OutOfMemoryError("x"))
    assert is_out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))


# --------------------------------------------------------------------------- bad input, resume rules


def test_malformed_lines_stop_before_work_or_are_skipped(loads, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": "many"}\n\n{"prompt": "c", "sampler": "eulr"}\n'
                       '{"prompt": "d", "size": 10}\n')
    out = tmp_path / "out"
    loads.reset_mock()
    code, _, err = batch([prompts, "--out", out, *SMALL], capsys)
    assert code == 2 and not out.exists() and not loads.called
    assert err.count("\n") == 1 and f"{prompts}:2: steps must be an integer" in err and "--on-error skip" in err

    code, summary, err = batch([prompts, "--out", out, *SMALL, "--on-error", "skip"], capsys)
    assert code == 0
    assert summary["generated"] == [0]
    assert [(e["line"], e["index"]) for e in summary["errors"]] == [(2, 1), (4, 2), (5, 3)]
    assert f"{prompts}:4: sampler: " in err and "did you mean 'euler'" in err
    assert f"{prompts}:5: size: " in err and "multiples of" in err  # the model's own size check, per line


def test_run_batch_sends_every_message_to_its_say_or_the_log(loads, tmp_path, capsys, caplog):
    """From Python, run_batch prints nothing: progress and line warnings go to `say`, or by
    default to the `flowkit.batch` logger (warnings at WARNING)."""
    from flowkit.cli.batch import batch_options
    from flowkit.batch.runner import run_batch
    from flowkit.cli import build_parser

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": "many"}\n')
    said: list[str] = []
    argv = ["batch", str(prompts), *SMALL, "--on-error", "skip", "--no-progress"]
    summary = run_batch(batch_options(build_parser().parse_args([*argv, "--out", str(tmp_path / "a")])),
                        say=said.append)
    assert summary.generated == [0]
    assert any(f"{prompts}:2: steps must be an integer" in t and t.startswith("warning:") for t in said)
    assert any("rank 0 of world size 1" in t for t in said)
    with caplog.at_level("INFO", logger="flowkit.batch"):
        run_batch(batch_options(build_parser().parse_args([*argv, "--out", str(tmp_path / "b")])))
    levels = {r.getMessage().split(":")[0]: r.levelname for r in caplog.records if r.name == "flowkit.batch"}
    assert levels.get("warning") == "WARNING" and "INFO" in levels.values()
    assert capsys.readouterr() == ("", "")


def test_unwritable_out_fails_before_the_model_is_loaded(loads, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    loads.reset_mock()
    code, _, err = batch([prompts, "--out", blocker / "sub", *SMALL], capsys)
    assert code == 2 and "--out: cannot create folder" in err and not loads.called
    code, _, err = batch([prompts, "--out", blocker, *SMALL], capsys)
    assert code == 2 and "is a file" in err
    code, _, err = batch([prompts, "--out", tmp_path / "seq", "--model", "dna"], capsys)
    assert code == 2 and "makes sequences" in err and not loads.called
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        code, _, err = batch([prompts, "--out", locked, *SMALL], capsys)
        assert code == 2 and "--out: cannot write in" in err and not loads.called


def test_resume_skips_done_refuses_other_settings_unless_force(loads, tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    assert batch([prompts, "--out", out, *SMALL], capsys)[1]["generated"] == [0, 1, 2]
    code, summary, _ = batch([prompts, "--out", out, *SMALL], capsys)
    assert code == 0 and summary["generated"] == [] and summary["already_done"] == 3

    code, _, err = batch([prompts, "--out", out, *SMALL[:-4], "--steps", "3", "--height", "16", "--width", "16"],
                         capsys)
    assert code == 2 and err.count("\n") == 1 and "steps 2 -> 3" in err and "--force" in err

    prompts.write_text("a\nB\nc\n")  # the file changed: line 2 only
    code, _, err = batch([prompts, "--out", out, *SMALL], capsys)
    assert code == 2 and "prompts" in err
    code, summary, err = batch([prompts, "--out", out, *SMALL, "--force"], capsys)
    assert code == 0 and summary["generated"] == [1]
    # the old image of line 2 is kept (an orphan, reported); the new one takes the next free name
    assert sorted(p.name for p in out.glob("*.png")) == ["000000-a.png", "000001-b-2.png", "000001-b.png",
                                                         "000002-c.png"]
    assert summary["orphans"] == ["000001-b.png"] and "1 finished image no longer belongs" in err
    assert [r["prompt"] for r in records(out)] == ["a", "B", "c"]
    assert [r["file"] for r in records(out)] == ["000000-a.png", "000001-b-2.png", "000002-c.png"]
    assert [(r["prompt"], r["file"]) for r in map(json.loads, (out / "orphans.jsonl").read_text().splitlines())] \
        == [("b", "000001-b.png")]

    code, summary, _ = batch([prompts, "--out", out, *SMALL, "--no-resume"], capsys)
    assert code == 0 and summary["generated"] == [0, 1, 2]
    assert len(summary["orphans"]) == 3 and len(list(out.glob("*.png"))) == 7  # nothing deleted

    from flowkit.batch.files import lock_folder

    held = lock_folder(out)  # another run writing to the same folder
    try:
        code, _, err = batch([prompts, "--out", out, *SMALL], capsys)
        assert code == 2 and "another `flowkit batch` is writing to" in err
    finally:
        held.close()


# --------------------------------------------------------------------------- issue 22: no user file touched


def test_foreign_files_and_finished_images_survive_a_forced_resume_with_a_shorter_file(loads, tmp_path, capsys):
    """Item 2: the stale-temporary clean-up deleted any `.NAME.DIGITS.tmp` (a user's
    `.notes.2024.tmp`, `.thesis.1.tmp`), and `--force` with a shorter prompt file deleted the
    images of the dropped lines. Now a run deletes only its own temporaries; every foreign
    file stays byte for byte, even one named like a batch image, and every finished image
    stays: the dropped lines' images are reported as orphans and listed in orphans.jsonl."""
    out = tmp_path / "out"
    out.mkdir()
    foreign = {".notes.2024.tmp": b"notes", ".thesis.1.tmp": b"thesis", "notes.txt": b"mine",
               "000001-2-red-circles.png": b"a user's own file with a batch-like name",
               ".flowkit-tmp-notes.txt": b"prefix, but not a flowkit temporary name", "sub": None}
    for name, data in foreign.items():
        (out / name).mkdir() if data is None else (out / name).write_bytes(data)
    (out / ".flowkit-tmp-000009-x.png.4242.tmp").write_bytes(b"a killed writer's temporary")  # flowkit's own
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"{k} red circles\n" for k in range(1, 7)))
    code, summary, err = batch([prompts, "--out", out, *SMALL, "--batch-size", "4"], capsys)
    assert code == 0 and summary["generated"] == list(range(6)), err
    recs = records(out)
    assert recs[1]["file"] == "000001-2-red-circles-2.png"  # the user's file kept its name
    finished = {r["file"]: (out / r["file"]).read_bytes() for r in recs}
    assert not (out / ".flowkit-tmp-000009-x.png.4242.tmp").exists()

    prompts.write_text("1 red circles\n2 red circles\nthree blue squares\n")  # lines 4-6 dropped, line 3 changed
    code, summary, err = batch([prompts, "--out", out, *SMALL, "--force"], capsys)
    assert code == 0 and summary["generated"] == [2], err
    assert sorted(summary["orphans"]) == sorted(r["file"] for r in recs[2:])
    assert "4 finished images no longer belong to this run" in err and "orphans.jsonl" in err
    for name, data in foreign.items():
        assert (out / name).is_dir() if data is None else (out / name).read_bytes() == data, name
    for name, data in finished.items():
        assert (out / name).read_bytes() == data, name
    orphans = [json.loads(line) for line in (out / "orphans.jsonl").read_text().splitlines()]
    assert sorted(r["file"] for r in orphans) == sorted(summary["orphans"])
    assert [r["prompt"] for r in records(out)] == ["1 red circles", "2 red circles", "three blue squares"]
    assert len(list(out.glob("*.png"))) == 6 + 1 + 1  # finished, the new line 3, the user's own

    code, summary, err = batch([prompts, "--out", out, *SMALL], capsys)  # a resume reports nothing new
    assert code == 0 and summary["generated"] == [] and summary["orphans"] == [] and "orphan" not in err


def test_a_resume_keeps_an_image_edited_since_written_and_makes_the_item_again(loads, tmp_path, capsys):
    """Audit of #22: a resume deleted a finished image whose bytes no longer matched its
    sha256 (a user who re-saved it lost the edit). Now the edited file stays byte for byte,
    is listed in orphans.jsonl (reason "changed since written"), and the item is made again
    under a free name. Mutant caught: `_prepare` unlinking a recorded image that does not
    verify (the old code) -- the edited bytes are gone."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\n")
    out = tmp_path / "out"
    assert batch([prompts, "--out", out, *SMALL], capsys)[1]["generated"] == [0, 1, 2]
    edited = out / records(out)[1]["file"]
    image = Image.open(edited).convert("RGB")
    image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
    image.save(edited)  # the user re-saves it: other bytes
    data = edited.read_bytes()

    code, summary, err = batch([prompts, "--out", out, *SMALL], capsys)
    assert code == 0 and summary["generated"] == [1], err
    assert edited.read_bytes() == data  # the edit is still there
    assert summary["orphans"] == [edited.name] and "1 image changed since written" in err
    new = records(out)[1]
    assert new["file"] != edited.name and (out / new["file"]).is_file()
    assert (out / new["file"]).read_bytes() != data
    listed = [json.loads(line) for line in (out / "orphans.jsonl").read_text().splitlines()]
    assert [(r["file"], r["reason"]) for r in listed] == [(edited.name, "changed since written")]
    code, summary, err = batch([prompts, "--out", out, *SMALL], capsys)  # reported once
    assert code == 0 and summary["generated"] == [] and summary["orphans"] == [] and "changed" not in err


def test_batch_images_record_their_settings_in_png_text(loads, tmp_path, capsys):
    """Item 1, batch side: a batch image carries the same text chunks as generate's, with the
    item's own seed (seed column: seed_index 0, the image of `generate PROMPT --seed s`)."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red circle", "seed": 7, "negative_prompt": "blue"}\n')
    assert batch([prompts, "--out", tmp_path / "out", *SMALL], capsys)[0] == 0
    [rec] = records(tmp_path / "out")
    with Image.open(tmp_path / "out" / rec["file"]) as im:
        text = dict(im.text)
    assert {k: text[k] for k in ("prompt", "negative_prompt", "seed", "seed_index", "steps", "size", "model")} == {
        "prompt": "a red circle", "negative_prompt": "blue", "seed": "7", "seed_index": "0", "steps": "2",
        "size": "16x16", "model": "tiny"}
    assert text["noise_seed"] == str(seed_for(7, 0)) and text["guidance"].startswith("cfg:scale=")


@pytest.mark.parametrize("line, words", [
    ('{"prompt": "a", "seed": "3"}', 'seed must be a JSON number, not a string: write 3 without quotes'),
    ('{"prompt": "a", "steps": "2"}', 'steps must be a JSON number'),
    ('{"prompt": "a", "prompt": "b"}', 'the key \'prompt\' appears twice'),
    ('{"prompt": "a", "steps": 10001}', 'steps must be an integer from 1 to 10000'),
    ('{"prompt": "a", "size": "99999x32"}', 'size must be from 1 to 8192 px'),
])
def test_jsonl_numbers_as_strings_and_duplicate_keys_are_refused_with_file_and_line(line, words):
    """Item 8: JSONL `"seed": "3"` and `"steps": "2"` were silently converted and a duplicate
    "prompt" key kept the last one; steps up to 100,000 and sizes up to 100,000 px passed.
    Each is now a line error (file:LINE in the run's message). CSV cells stay text."""
    parsed = parse_prompt_lines(f'{{"prompt": "ok"}}\n{line}\n'.encode(), ".jsonl")
    [err] = parsed.errors
    assert err.line == 2 and words in err.message, err.message
    csv = parse_prompt_lines(b"prompt,seed,steps\na,3,2\n", ".csv")
    assert (csv.items[0].seed, csv.items[0].steps) == (3, 2)


def test_a_prompt_file_linked_to_dev_zero_stops_at_the_limit(loads, tmp_path, capsys):
    """Item 4: a prompt file that is a link to /dev/zero was read until memory ran out (5.5 GB);
    now reading stops at the limit (64 MiB) with one line, before the model loads."""
    link = tmp_path / "zero.txt"
    link.symlink_to("/dev/zero")
    loads.reset_mock()
    code, _, err = batch([link, "--out", tmp_path / "out", *SMALL], capsys)
    assert code == 2 and err.count("\n") == 1 and "larger than 64 MiB" in err and not loads.called


def test_ctrl_c_in_batch_says_how_to_resume(loads, tmp_path, capsys, monkeypatch):
    """Item 9: Ctrl-C in `batch` printed only "interrupted"; it now says that the finished
    images are kept and that the same command resumes."""
    import flowkit.batch.runner as runner

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\n")
    monkeypatch.setattr(runner, "_sample_shard", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code, _, err = batch([prompts, "--out", tmp_path / "out", *SMALL], capsys)
    assert code == 130
    assert err.splitlines()[-1] == (f"flowkit: interrupted; the finished images are kept in {tmp_path / 'out'}: "
                                    "run the same command again to resume (it makes only the missing ones)")
