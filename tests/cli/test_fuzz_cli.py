"""Property-based: malformed configs, arguments and files fed to every command.

Whatever hypothesis generates, a command must end with exit status 2 and one line on stderr (no
traceback), and every file that existed before must be byte-for-byte unchanged. The commands run in
this process (``cli.main``) so that hundreds of cases take seconds; an exception escaping ``main`` is
the traceback a user would see and fails the test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import shutil
import string
import typing
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from selective_amnesia.cli import main
from selective_amnesia.config import RunConfig
from selective_amnesia.core.fisher import Fisher, estimate_fisher
from selective_amnesia.io.artifacts import (
    COMPONENT_CONFIG,
    MODEL_CONFIG,
    SCHEDULER_CONFIG,
    load_tensors,
    save_tensors,
)
from selective_amnesia.models import build_model
from tests.conftest import TINY_CONFIG

SETTINGS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same cases on every CI run
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Good inputs and pre-existing outputs that no failing command may touch."""
    root = tmp_path_factory.mktemp("fuzz")
    torch.manual_seed(0)
    model = build_model("cvae", hidden_dims=[16], latent_dim=2)
    model.save_pretrained(root / "model")
    estimate_fisher(model, num_samples=8, labels=list(range(10)), progress=False).save(
        root / "fisher.safetensors"
    )
    shutil.copy(TINY_CONFIG, root / "config.yaml")
    (root / "out_dir").mkdir()
    (root / "out_dir" / "keep.txt").write_text("an earlier run\n")
    # a finished earlier run: a command that marked it running (or failed) on bad input would show here
    (root / "out_dir" / "amnesia_run.json").write_text('{"status": "complete", "command": "run"}\n')
    (root / "out.npz").write_bytes(b"earlier samples")
    (root / "out.json").write_text('{"earlier": true}\n')
    (root / "out.safetensors").write_bytes(b"earlier fisher")
    (root / "scratch").mkdir()
    return root


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and "scratch" not in p.parts
    }


def fails_cleanly(argv: list[str], root: Path) -> str:
    """Run ``amnesia argv``; assert exit 2, one stderr line, no traceback, nothing pre-existing changed."""
    before = snapshot(root)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(argv)
        except SystemExit as e:  # argparse
            code = e.code  # type: ignore[assignment]
    text = err.getvalue().strip()
    assert code == 2, (argv, code, text)
    assert "Traceback" not in text and len(text.splitlines()) == 1, (argv, text)
    assert text.startswith("amnesia"), (argv, text)
    after = snapshot(root)
    assert {k: after.get(k) for k in before} == before, argv
    return text


# ---- configs ----------------------------------------------------------------------------------


def _leaves(cls: type, prefix: str = "") -> list[tuple[str, typing.Any]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _leaves(tp, f"{prefix}{f.name}.")  # type: ignore[arg-type]
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


LEAVES = _leaves(RunConfig)
NUMERIC = [
    k for k, tp in LEAVES if int in typing.get_args(tp) or float in typing.get_args(tp) or tp in (int, float)
]
LISTS = [k for k, tp in LEAVES if typing.get_origin(tp) is list]
SCALARS = [k for k, _ in LEAVES if k not in LISTS]
CHOICES = {
    "data.dataset": ("mnist", "fashion_mnist", "cifar10", "stl10"),
    "model.family": ("cvae", "ddpm", "text_to_image"),
    "fisher.estimator": ("batched", "vmap", "loop", "all_timesteps", "subsampled"),
    "forget.objective": ("surrogate", "naive"),
    "forget.surrogate": ("uniform", "class", "folder"),
    "forget.replay": ("fresh", "stored"),
    "forget.reduction": ("sum", "mean"),
    "t2i.train": ("all", "cross_attention", "non_cross_attention", "regex"),
    "t2i.output": ("pipeline", "lora"),
    "t2i.mixed_precision": ("no", "bf16", "fp16"),
    "model.ddpm.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "model.ddpm.sampler": ("ddim", "ddpm"),
    "device": ("cpu", "cuda", "auto"),
}
WORDS = st.text(string.ascii_letters + "_", min_size=1, max_size=12)

negative = st.tuples(st.sampled_from(NUMERIC), st.one_of(st.integers(-(10**6), -1), st.floats(-1e6, -1e-6)))
not_finite = st.tuples(
    st.sampled_from([k for k in NUMERIC if k not in LISTS]),
    st.sampled_from(["nan", ".nan", ".inf", "-.inf", "inf"]),
)
wrong_type = st.one_of(
    st.tuples(st.sampled_from(SCALARS), st.sampled_from(["[1, 2]", "{a: 1}"])),
    st.tuples(
        st.sampled_from(NUMERIC), WORDS.filter(lambda w: w.lower() not in ("nan", "inf", "null", "infinity"))
    ),
    st.tuples(st.sampled_from(LISTS), st.sampled_from(["7", "{a: 1}", "word"])),
)
bad_choice = st.sampled_from(sorted(CHOICES)).flatmap(
    lambda k: st.tuples(st.just(k), WORDS.filter(lambda w, k=k: w not in CHOICES[k] and w.lower() != "null"))
)
unknown_key = st.tuples(
    st.sampled_from(["", "data.", "model.", "pretrain.", "fisher.", "forget.", "evaluate.", "t2i."]).flatmap(
        lambda p: WORDS.filter(lambda w: w not in {k.split(".")[-1] for k, _ in LEAVES}).map(lambda w: p + w)
    ),
    st.sampled_from(["1", "x", "[1]"]),
)


def _command(work: Path, name: str) -> list[str]:
    model, fisher = str(work / "model"), str(work / "fisher.safetensors")
    return {
        "run": ["run", str(work / "config.yaml"), "--out", str(work / "out_dir")],
        "pretrain": ["pretrain", str(work / "config.yaml"), "--out", str(work / "out_dir")],
        "fisher": ["fisher", "--model", model, "--out", str(work / "out.safetensors")],
        "forget": ["forget", "--model", model, "--fisher", fisher, "--out", str(work / "out_dir")],
        "evaluate": ["evaluate", "--model", model, "--out", str(work / "out.json")],
    }[name]


CONFIG_COMMANDS = st.sampled_from(["run", "pretrain", "fisher", "forget", "evaluate"])


@pytest.mark.parametrize("command", ["run", "pretrain", "fisher", "forget", "evaluate"])
def test_every_numeric_field_rejects_out_of_range_values(work: Path, command: str) -> None:
    """Exhaustive, not sampled: every numeric config field, with a negative, a non-finite and a huge value."""
    for key in NUMERIC:
        tp = dict(LEAVES)[key]
        is_list = key in LISTS
        is_int = tp is int or int in typing.get_args(tp)
        # -1 for everything; NaN for floats (not an integer at all: the wrong-type cases cover that);
        # 2**40 for integers (no count, size or seed is meaningful that large; a huge float can be valid)
        for value in ("-1", "nan" if not is_int else "-5", str(2**40) if is_int else "-0.5"):
            text = f"[{value}]" if is_list else value
            fails_cleanly([*_command(work, command), "--no-progress", f"{key}={text}"], work)


@SETTINGS
@given(command=CONFIG_COMMANDS, override=st.one_of(negative, not_finite, wrong_type, bad_choice, unknown_key))
def test_malformed_config_values_fail_cleanly(work: Path, command: str, override: tuple[str, object]) -> None:
    key, value = override
    assume(key != "progress")  # --no-progress below sets it after the override: no fault is left
    fails_cleanly([*_command(work, command), "--no-progress", f"{key}={value}"], work)


TOP_LEVEL = {f.name for f in dataclasses.fields(RunConfig)}
malformed_yaml = st.one_of(
    st.binary(max_size=200).map(lambda b: b"\xff\xfe" + b),  # not UTF-8 text
    st.lists(st.integers() | WORDS, max_size=5).map(lambda v: yaml.safe_dump(v).encode()),  # not a mapping
    st.dictionaries(WORDS.filter(lambda w: w not in TOP_LEVEL), st.integers(), min_size=1, max_size=3).map(
        lambda d: yaml.safe_dump(d).encode()
    ),  # unknown sections
    st.text(max_size=100).map(lambda t: ("forget: [" + t).encode()),  # broken syntax
    st.sampled_from([b"!!python/object/apply:os.system ['touch pwned']\n", b"forget: !!binary aGk=\n"]),
)


@SETTINGS
@given(command=CONFIG_COMMANDS, content=malformed_yaml)
def test_malformed_config_files_fail_cleanly(work: Path, command: str, content: bytes) -> None:
    path = work / "scratch" / "bad.yaml"
    path.write_bytes(content)
    argv = _command(work, command)
    if command in ("run", "pretrain"):
        argv[1] = str(path)
    else:
        argv.insert(1, str(path))
    fails_cleanly([*argv, "--no-progress"], work)
    assert not Path("pwned").exists()


# ---- arguments --------------------------------------------------------------------------------

bad_sample_option = st.one_of(
    st.tuples(st.just("--labels"), st.sampled_from(["", ",", "a", "1,b", "10", "-1", "1;2", "99,0", "1.5"])),
    st.tuples(st.just("--num-per-label"), st.integers(-100, 0).map(str) | WORDS),
    st.tuples(st.just("--seed"), (st.integers(-(10**9), -1) | st.integers(2**32, 2**80)).map(str) | WORDS),
    st.tuples(st.just("--batch-size"), st.integers(-100, 0).map(str)),
    st.tuples(st.just("--steps"), st.integers(-5, 50).map(str)),  # any --steps: a VAE has no sampler
    st.tuples(st.just("--guidance-scale"), st.sampled_from(["-1", "nan", "inf", "x"])),
    st.tuples(st.just("--device"), st.sampled_from(["gpu", "cuda:x", "tpu", ""])),
    st.tuples(st.just("--prompt"), st.sampled_from(["a cat", ""])),  # prompts: not for a VAE
    # x.png (a grid) and x (a folder of PNGs) are valid outputs; out_dir exists already
    st.tuples(st.just("--out"), st.sampled_from(["x.txt", "x.json", "out_dir"])),
    st.tuples(st.just("--model"), st.sampled_from(["missing", "out.npz", "out_dir", "scratch"])),
    st.tuples(st.just("--bogus"), st.just("1")),
)


@SETTINGS
@given(option=bad_sample_option)
def test_malformed_sample_arguments_fail_cleanly(work: Path, option: tuple[str, str]) -> None:
    flag, value = option
    if flag in ("--out", "--model") and value in ("out_dir", "out.npz", "missing", "scratch", "x.png", "x"):
        value = str(work / value)
    args = {"--model": str(work / "model"), "--labels": "1,2", "--out": str(work / "out.npz")}
    args[flag] = value
    argv = ["sample", "--num-per-label", "2", "--no-progress"]
    for k, v in args.items():
        argv += [k, v] if not (k == "--steps" and v == "") else []
    fails_cleanly(argv, work)


bad_paths = st.sampled_from(["missing", "out.npz", "out_dir", "out.json", "scratch"])


@SETTINGS
@given(
    command=st.sampled_from(["fisher", "forget", "evaluate", "sample", "convert"]),
    model=bad_paths,
    out=st.sampled_from(["out.npz", "out_dir", "x.txt", "out.json", "out.safetensors"]),
)
def test_wrong_paths_fail_cleanly(work: Path, command: str, model: str, out: str) -> None:
    argv = {
        "fisher": ["fisher", "--model", str(work / model), "--out", str(work / out)],
        "forget": ["forget", "--model", str(work / model), "--out", str(work / out)],
        "evaluate": ["evaluate", "--model", str(work / model), "--out", str(work / out)],
        "sample": ["sample", "--model", str(work / model), "--labels", "1", "--out", str(work / out)],
        "convert": ["convert", str(work / model), "--out", str(work / out)],
    }[command]
    fails_cleanly([*argv, "--no-progress"] if command != "convert" else argv, work)


# ---- files ------------------------------------------------------------------------------------


def _corrupt_model(work: Path, how: str, data: st.DataObject) -> Path:
    target = work / "scratch" / "model"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(work / "model", target)
    weights, config = target / "model.safetensors", target / "config.json"
    if how == "truncate":
        raw = weights.read_bytes()
        weights.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "garbage_weights":
        weights.write_bytes(data.draw(st.binary(max_size=300)))
    elif how == "garbage_config":
        config.write_bytes(data.draw(st.binary(max_size=200)))
    elif how == "wrong_config":
        field = data.draw(
            st.sampled_from(["hidden_dims", "latent_dim", "image_size", "num_classes", "family"])
        )
        value = data.draw(st.sampled_from(['"x"', "-3", "[]", "[8, 8]", "1000", "null", '"ddpm"']))
        text = config.read_text()
        import json

        meta = json.loads(text)
        meta[field] = json.loads(value)
        config.write_text(json.dumps(meta))
    elif how == "missing_weights":
        weights.unlink()
    elif how == "nan_weights":
        tensors, meta = load_tensors(weights)
        name = data.draw(st.sampled_from(sorted(tensors)))
        tensors[name] = torch.full_like(tensors[name], float("nan"))
        save_tensors(weights, tensors, meta)
    return target


@SETTINGS
@given(
    command=st.sampled_from(["fisher", "forget", "evaluate", "sample"]),
    how=st.sampled_from(["truncate", "garbage_weights", "garbage_config", "wrong_config", "missing_weights"]),
    data=st.data(),
)
def test_corrupt_models_fail_cleanly(work: Path, command: str, how: str, data: st.DataObject) -> None:
    model = str(_corrupt_model(work, how, data))
    argv = {
        "fisher": ["fisher", "--model", model, "--out", str(work / "out.safetensors")],
        "forget": ["forget", "--model", model, "--fisher", str(work / "fisher.safetensors")],
        "evaluate": ["evaluate", "--model", model, "--out", str(work / "out.json")],
        "sample": ["sample", "--model", model, "--labels", "1", "--out", str(work / "out.npz")],
    }[command]
    if command == "forget":
        argv += ["--out", str(work / "out_dir")]
    fails_cleanly([*argv, "--no-progress"], work)


@SETTINGS
@given(
    how=st.sampled_from(
        ["truncate", "garbage", "nan", "inf", "negative", "shape", "missing_key", "other_model"]
    ),
    data=st.data(),
)
def test_bad_fishers_fail_cleanly(work: Path, how: str, data: st.DataObject) -> None:
    path = work / "scratch" / "fisher.safetensors"
    fisher = Fisher.load(work / "fisher.safetensors")
    values = dict(fisher.values)
    name = data.draw(st.sampled_from(sorted(values)))
    if how in ("nan", "inf", "negative"):
        v = values[name].clone().flatten()
        v[data.draw(st.integers(0, v.numel() - 1))] = {
            "nan": float("nan"),
            "inf": float("inf"),
            "negative": -1.0,
        }[how]
        values[name] = v.view_as(values[name])
    elif how == "shape":
        values[name] = values[name].flatten()[:-1] if values[name].numel() > 1 else torch.zeros(2)
    elif how == "missing_key":
        del values[name]
    elif how == "other_model":
        values = {f"other.{k}": v for k, v in values.items()}
    Fisher(values, fisher.metadata).save(path)
    if how == "truncate":
        raw = path.read_bytes()
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])
    elif how == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=300)))
    argv = ["forget", "--model", str(work / "model"), "--fisher", str(path), "--out", str(work / "out_dir")]
    fails_cleanly([*argv, "--no-progress"], work)


@SETTINGS
@given(content=st.binary(max_size=400))
def test_convert_refuses_garbage(work: Path, content: bytes) -> None:
    path = work / "scratch" / "legacy.pt"
    path.write_bytes(content)
    fails_cleanly(["convert", str(path), "--out", str(work / "scratch" / "converted.safetensors")], work)


def test_a_full_disk_fails_cleanly_and_keeps_the_old_output(work: Path, tmp_path: Path) -> None:
    """A real write failure: the output file may not grow past 2 KB (RLIMIT_FSIZE, EFBIG)."""
    import os
    import resource
    import signal
    import subprocess
    import sys

    out = tmp_path / "samples.npz"
    out.write_bytes(b"earlier samples")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, 2048))

    amnesia = Path(sys.executable).parent / "amnesia"
    argv = ["sample", "--model", str(work / "model"), "--labels", "0,1", "--num-per-label", "50"]
    r = subprocess.run(
        [str(amnesia), *argv, "--out", str(out), "--no-progress", "--force"],  # over the earlier file
        preexec_fn=limit,
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        timeout=120,
    )
    assert r.returncode == 2 and "disk is full" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert out.read_bytes() == b"earlier samples"
    assert [p.name for p in tmp_path.iterdir()] == ["samples.npz"]  # no temp file or lock left


# ---- text-to-image inputs ----------------------------------------------------------------------

bad_prompt_files = st.one_of(
    st.just(b""),
    st.lists(st.sampled_from(["", "   ", "# a comment"]), max_size=4).map(lambda v: "\n".join(v).encode()),
    st.binary(max_size=100).map(lambda b: b"\xff\xfe" + b),
)
CSV_HEAD = "prompt,sd_seed,sd_guidance_scale\n"
bad_csvs = st.one_of(
    st.just(b""),
    st.just(b"prompt,sd_seed\n"),  # a header, no row
    st.sampled_from(["seed", "x", "-1", "1.5", ""]).map(
        lambda v: f"prompt,sd_seed,sd_guidance_scale\ncat,{v},7.5\n".encode()
    ),
    st.sampled_from(["nan", "-2", "x"]).map(
        lambda v: f"prompt,sd_seed,sd_guidance_scale\ncat,1,{v}\n".encode()
    ),
    st.just(b"text,seed\ncat,1\n"),  # no prompt column
    st.binary(max_size=100).map(lambda b: b"\xff\xfe" + b),
)
bad_t2i_overrides = st.sampled_from(
    [
        "t2i.forget_prompts=[]",
        "t2i.forget_prompts=['']",
        "t2i.forget_prompts=[1, 2]",
        "t2i.surrogate_path=/nonexistent/images",
        "t2i.surrogate_prompt=null",
        "t2i.replay_prompts=/nonexistent/prompts.txt",
        "t2i.lora_rank=-1",
        "t2i.output=lora",
        "t2i.train=regex",
        "t2i.train_patterns=['[']",
        "t2i.mixed_precision=fp8",
    ]
)


@settings(SETTINGS, max_examples=40)  # each case loads the pipeline
@given(
    kind=st.sampled_from(["sample", "evaluate", "run"]),
    prompts=bad_prompt_files,
    csv=bad_csvs,
    override=bad_t2i_overrides,
)
def test_malformed_text_to_image_inputs_fail_cleanly(
    work: Path, tiny_sd: Path, kind: str, prompts: bytes, csv: bytes, override: str
) -> None:
    scratch = work / "scratch"
    (scratch / "prompts.txt").write_bytes(prompts)
    (scratch / "i2p.csv").write_bytes(csv)
    argv = {
        "sample": ["sample", "--model", str(tiny_sd), "--prompts-file", str(scratch / "prompts.txt")],
        "evaluate": ["evaluate", "--model", str(tiny_sd), "--i2p-csv", str(scratch / "i2p.csv")],
        "run": [
            "run",
            str(TINY_CONFIG.parent / "t2i_mnist.yaml"),
            f"t2i.model={tiny_sd}",
            "t2i.forget_prompts=[a cat]",
            override,
        ],
    }[kind]
    out = {"sample": "out.npz", "evaluate": "out.json", "run": "out_dir"}[kind]
    fails_cleanly([*argv, "--out", str(work / out), "--no-progress"], work)


@SETTINGS
@given(
    files=st.lists(st.binary(max_size=64), max_size=3),
    good=st.integers(0, 2),
    suffix=st.sampled_from([".png", ".jpg"]),
)
def test_broken_surrogate_image_folders_fail_cleanly(
    work: Path, files: list[bytes], good: int, suffix: str
) -> None:
    """Unreadable image files (with or without good ones beside them), or a folder without images."""
    from PIL import Image

    folder = work / "scratch" / "images"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for i in range(good if files else 0):
        Image.new("L", (9 + i, 30)).save(folder / f"good{i}.png")
    for i, content in enumerate(files):
        (folder / f"bad{i}{suffix}").write_bytes(content)
    argv = ["forget", "--model", str(work / "model"), "--fisher", str(work / "fisher.safetensors")]
    argv += ["--out", str(work / "out_dir"), "--no-progress", "forget.surrogate=folder"]
    fails_cleanly([*argv, f"forget.surrogate_path={folder}"], work)


# ---- untrusted JSON and YAML past the limits; schemas; symlinked outputs (issue 16) -------------


def _bomb(width: int, levels: int, use: str) -> str:
    """A YAML "billion laughs": each anchor repeats the previous one ``width`` times."""
    names = [f"l{i}" for i in range(levels)]
    text = f"{names[0]}: &{names[0]} [{', '.join(['x'] * width)}]\n"
    for prev, name in zip(names, names[1:], strict=False):
        text += f"{name}: &{name} [{', '.join([f'*{prev}'] * width)}]\n"
    return text + use.replace("LAST", names[-1])


hostile_yaml = st.one_of(
    st.integers(65, 3000).map(lambda d: "forget:\n  lr: " + "[" * d + "]" * d + "\n"),
    st.integers(65, 300).map(lambda d: "".join(f"{'  ' * i}k{i}:\n" for i in range(d)) + "  " * d + "x: 1\n"),
    st.integers(42, 6000).map(lambda n: f"seed: {'9' * n}\n"),
    st.integers(42, 6000).map(lambda n: f"model:\n  hidden_dims: [-{'9' * n}]\n"),
    st.tuples(
        st.integers(3, 12), st.integers(3, 10), st.sampled_from(["", "model: {hidden_dims: *LAST}\n"])
    ).map(lambda t: _bomb(*t)),
)


@settings(SETTINGS, max_examples=60)
@given(command=CONFIG_COMMANDS, content=hostile_yaml, dry_run=st.booleans())
def test_hostile_config_files_fail_cleanly(work: Path, command: str, content: str, dry_run: bool) -> None:
    """Nesting depth, huge integers and alias bombs: one short line, quickly."""
    path = work / "scratch" / "hostile.yaml"
    path.write_text(content)
    argv = _command(work, command)
    if command in ("run", "pretrain"):
        argv[1] = str(path)
    else:
        argv.insert(1, str(path))
    if command == "run" and dry_run:
        argv.append("--dry-run")
    assert len(fails_cleanly([*argv, "--no-progress"], work)) < 2100


hostile_json = st.one_of(
    st.integers(65, 5000).map(lambda d: "[" * d + "]" * d),
    st.integers(65, 500).map(lambda d: '{"a": ' * d + "1" + "}" * d),
    st.integers(42, 6000).map(lambda n: "9" * n),
    st.integers(42, 6000).map(lambda n: "-" + "9" * n),
)
WRONG_JSON = ['"x"', "[]", '{"a": 1}', "true", "null", "-1", "1.5", '[1, "a"]', "[true]", "1e400", "NaN"]


def _with_value(meta: dict[str, object], key: str, raw: str) -> str:
    return json.dumps({**meta, key: "__VALUE__"}).replace('"__VALUE__"', raw)


@settings(SETTINGS, max_examples=80)
@given(
    command=st.sampled_from(["fisher", "evaluate", "sample", "forget"]),
    key=st.sampled_from(sorted(MODEL_CONFIG)),
    raw=st.one_of(hostile_json, st.sampled_from(WRONG_JSON)),
)
def test_hostile_model_configs_fail_cleanly(work: Path, command: str, key: str, raw: str) -> None:
    """Every key of the model config.json schema: a wrong type, or a value past the limits."""
    if raw in WRONG_JSON:  # a value that is right for this key's type is no fault
        value = json.loads(raw.replace("NaN", '"nan"')) if raw != "1e400" else float("inf")
        assume(not MODEL_CONFIG[key][1](value) and not (key == "family" and raw == '"x"'))
    model = work / "scratch" / "model"
    shutil.rmtree(model, ignore_errors=True)
    shutil.copytree(work / "model", model)
    meta = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(_with_value(meta, key, raw))
    argv = {
        "fisher": ["fisher", "--model", str(model), "--out", str(work / "out.safetensors")],
        "evaluate": ["evaluate", "--model", str(model), "--out", str(work / "out.json")],
        "sample": ["sample", "--model", str(model), "--labels", "1", "--out", str(work / "out.npz")],
        "forget": ["forget", "--model", str(model), "--fisher", str(work / "fisher.safetensors")],
    }[command]
    if command == "forget":
        argv += ["--out", str(work / "out_dir")]
    assert len(fails_cleanly([*argv, "--no-progress"], work)) < 2100


@settings(SETTINGS, max_examples=60)
@given(
    file=st.sampled_from(["model_index.json", "scheduler/scheduler_config.json", "unet/config.json"]),
    data=st.data(),
)
def test_hostile_pipeline_files_fail_cleanly(
    work: Path, tiny_sd: Path, file: str, data: st.DataObject
) -> None:
    """model_index.json, scheduler_config.json and a component config: wrong types per schema key, values
    past the limits, components that are not [library, class] pairs; refused before any weight loads."""
    schema = {
        "model_index.json": {"unet": ("a pair", lambda v: False), "vae": ("a pair", lambda v: False)},
        "scheduler/scheduler_config.json": SCHEDULER_CONFIG,
        "unet/config.json": COMPONENT_CONFIG,
    }[file]
    key = data.draw(st.sampled_from(sorted(schema)))
    raw = data.draw(st.one_of(hostile_json, st.sampled_from(WRONG_JSON)))
    if raw in WRONG_JSON:
        value = json.loads(raw.replace("NaN", '"nan"')) if raw != "1e400" else float("inf")
        assume(not schema[key][1](value))
    pipe = work / "scratch" / "sd"
    shutil.rmtree(pipe, ignore_errors=True)
    shutil.copytree(tiny_sd, pipe)
    meta = json.loads((pipe / file).read_text())
    (pipe / file).write_text(_with_value(meta, key, raw))
    argv = ["sample", "--model", str(pipe), "--prompt", "a cat", "--out", str(work / "out.npz")]
    assert len(fails_cleanly([*argv, "--no-progress"], work)) < 2100


@settings(SETTINGS, max_examples=40)
@given(
    command=st.sampled_from(["run", "pretrain", "fisher", "forget", "evaluate", "sample"]),
    link=st.sampled_from(["dangling", "dangling_parent", "elsewhere", "input"]),
)
def test_symlinked_outputs_fail_cleanly(
    work: Path, tmp_path_factory: pytest.TempPathFactory, command: str, link: str
) -> None:
    """--out through a dangling link (itself or a parent), a link leading out of its folder, or a link to
    an input: refused, and nothing is created at the link's target."""
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    suffix = {"fisher": ".safetensors", "evaluate": ".json", "sample": ".npz"}.get(command, "")
    name = work / "scratch" / f"link{suffix}"
    name.unlink(missing_ok=True)
    target = {
        "dangling": elsewhere / "a" / f"b{suffix}",
        "dangling_parent": elsewhere / "a",
        "elsewhere": elsewhere,
        "input": work / "model",
    }[link]
    if link == "elsewhere" and suffix:
        target = elsewhere / f"x{suffix}"
        target.write_bytes(b"keep")
    name.symlink_to(target)
    out = name / f"o{suffix}" if link == "dangling_parent" else name
    model, fisher = str(work / "model"), str(work / "fisher.safetensors")
    argv = {
        "run": ["run", str(work / "config.yaml")],
        "pretrain": ["pretrain", str(work / "config.yaml")],
        "fisher": ["fisher", "--model", model],
        "forget": ["forget", "--model", model, "--fisher", fisher],
        "evaluate": ["evaluate", "--model", model],
        "sample": ["sample", "--model", model, "--labels", "1"],
    }[command]
    fails_cleanly([*argv, "--out", str(out), "--no-progress"], work)
    assert [p.name for p in elsewhere.iterdir()] == ([f"x{suffix}"] if link == "elsewhere" and suffix else [])
