"""Artifacts: safetensors + JSON, written to a temporary name and renamed into place.

Nothing here uses pickle. Readers turn missing or corrupt files into ``AmnesiaError``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import reprlib
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from selective_amnesia import faults
from selective_amnesia.errors import AmnesiaError
from selective_amnesia.families import declared_family, get_family


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and a writer may recreate the file): the output gets the mode any new
        # file would get, 0644 under umask 022
        os.chmod(tmp, created_mode())
        faults.point("io.before_rename")  # the data is written, not yet visible under its name
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def created_mode(directory: bool = False) -> int:
    """The mode a new file (0644 under umask 022) or directory (0755) gets: for outputs staged under a
    0600/0700 temporary name (``mkstemp``/``mkdtemp``) before they are renamed into place."""
    return (0o777 if directory else 0o666) & ~_umask()


def partial_dir(out: str | Path) -> Path:
    """Where the resumable work towards the output file ``out`` is kept until ``out`` is written."""
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def write_json(path: str | Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---- untrusted JSON and YAML ------------------------------------------------------------------
# Every JSON and YAML file the tool reads goes through ``read_json``/``parse_yaml``. The limits lie far
# above anything the tool writes (a run config, an SD model_index.json, a checkpoint's state.json); past
# them a file is broken or hostile, and it ends in one line instead of a RecursionError, a ValueError of
# Python's 4,300-digit limit, or gigabytes of expanded YAML aliases.
MAX_FILE_BYTES = 64 * 2**20
MAX_DEPTH = 64
MAX_NODES = 1_000_000  # values, counted after YAML aliases are expanded ("billion laughs")
MAX_INT_DIGITS = 40
MAX_PARAMETERS = 20 * 10**9  # over 7x SDXL's UNet
MAX_TIMESTEPS = 100_000  # the noise schedule's buffers are allocated at this length

_short_repr = reprlib.Repr()
_short_repr.maxlevel = 2
_short_repr.maxstring = _short_repr.maxother = 60
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = _short_repr.maxset = 4
_short_repr.maxlong = 40


def short(value: Any) -> str:
    """``repr(value)`` cut to a few dozen characters: error messages quote untrusted values."""
    try:
        return _short_repr.repr(value)
    except ValueError:  # an int past Python's digit limit cannot even be printed
        return "<a huge integer>"


class InvalidJSON(AmnesiaError):
    """Text that is not JSON at all (as opposed to JSON past a limit)."""


class _BigInt:
    """An integer literal too long to convert, kept as text so that ``check_tree`` can name its key."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __repr__(self) -> str:
        return f"<an integer of {len(self.text)} characters>"


def _key(where: str, key: Any) -> str:
    name = key if isinstance(key, str) and len(key) <= 60 else short(key)
    return f"{where}.{name}" if where else str(name)


def check_tree(value: Any, source: str) -> None:
    """Depth, size and integer limits over a parsed JSON/YAML value; iterative, so any depth is safe."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    nodes = 0
    while stack:
        item, where, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise AmnesiaError(f"{source} holds more than {MAX_NODES:,} values: not a file this tool reads")
        if depth > MAX_DEPTH:
            raise AmnesiaError(
                f"{source}: {where[:120]}... is nested deeper than {MAX_DEPTH} levels: "
                "not a file this tool reads"
            )
        if isinstance(item, _BigInt) or (
            isinstance(item, int) and not isinstance(item, bool) and abs(item) >= 10**MAX_INT_DIGITS
        ):
            raise AmnesiaError(
                f"{source}: {where or 'the value'} is an integer of more than {MAX_INT_DIGITS} digits: fix it"
            )
        if isinstance(item, dict):
            stack.extend((v, _key(where, k), depth + 1) for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{where}[{i}]", depth + 1) for i, v in enumerate(item))


def _cut(text: str, n: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n] + "..."


def read_bytes_limited(path: str | Path, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a config, an index, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise AmnesiaError(f"{path} not found")
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:
        raise AmnesiaError(
            f"{path} is larger than {limit:,} bytes: not a config or metadata file this tool reads"
        )
    return raw


def parse_json(text: str, source: str) -> Any:
    """``json.loads`` within the limits above; every failure is an ``AmnesiaError`` naming ``source``."""

    def parse_int(digits: str) -> int | _BigInt:
        return _BigInt(digits) if len(digits) > MAX_INT_DIGITS + 1 else int(digits)

    try:
        value = json.loads(text, parse_int=parse_int)
    except RecursionError:
        raise AmnesiaError(
            f"{source} is nested deeper than {MAX_DEPTH} levels: not a file this tool reads"
        ) from None
    except ValueError as e:  # JSONDecodeError among them
        raise InvalidJSON(
            f"{source} is not valid JSON ({_cut(str(e))}); the file is corrupt, recreate it"
        ) from None
    check_tree(value, source)
    return value


def read_json(path: str | Path, schema: Callable[[Any, Path], None] | None = None) -> Any:
    """A JSON file, parsed within the limits above and checked by ``schema`` (value, path) when given.

    Files whose name says what they are get their schema without asking: a model's ``config.json``
    (cvae/ddpm), ``scheduler_config.json`` and ``model_index.json`` (whose components' configs are
    checked with it)."""
    path = Path(path)
    raw = read_bytes_limited(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise AmnesiaError(
            f"{path} is not valid JSON (not UTF-8 text); the file is corrupt, recreate it"
        ) from None
    value = parse_json(text, str(path))
    check = schema or _NAMED_SCHEMAS.get(path.name)
    if check is not None:
        check(value, path)
    return value


def _yaml_loader() -> type:
    import yaml

    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class Loader(base):  # type: ignore[misc,valid-type]
        """``safe_load`` (no tags beyond plain data), with over-long integers kept as text."""

    def construct_int(loader: Any, node: Any) -> Any:
        text = loader.construct_scalar(node)
        if len(text) > MAX_INT_DIGITS + 1:
            return _BigInt(text)
        return yaml.constructor.SafeConstructor.construct_yaml_int(loader, node)

    Loader.add_constructor("tag:yaml.org,2002:int", construct_int)
    return Loader


_YAML_LOADER: type | None = None


def _line(event: Any) -> int:
    mark = event.start_mark
    return mark.line + 1 if mark is not None else 0


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` within the limits above. Syntax errors raise ``yaml.YAMLError``; a document
    that is too deep or whose aliases expand past ``MAX_NODES`` values raises ``AmnesiaError``."""
    import yaml

    global _YAML_LOADER
    if _YAML_LOADER is None:
        _YAML_LOADER = _yaml_loader()
    # events first: they stream without building anything, so the size an alias stands for is
    # summed before any value exists (the composer would share the nodes, but every later walk,
    # message or dump expands them)
    sizes: dict[str, int] = {}
    frames: list[list[Any]] = []  # [anchor, values so far] of each open collection
    total = 0
    for event in yaml.parse(text, Loader=_YAML_LOADER):
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            frames.append([event.anchor, 1])
            if len(frames) > MAX_DEPTH:
                raise AmnesiaError(
                    f"{source} line {_line(event)}: nested deeper than {MAX_DEPTH} levels: "
                    "not a config this tool reads"
                )
            continue
        if isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            anchor, size = frames.pop()
        elif isinstance(event, yaml.ScalarEvent):
            anchor, size = event.anchor, 1
        elif isinstance(event, yaml.AliasEvent):
            anchor, size = None, sizes.get(event.anchor or "", 1)
        else:
            continue
        if anchor is not None:
            sizes[anchor] = size
        if frames:
            frames[-1][1] += size
        total += size if not frames else 0
        if size > MAX_NODES or total > MAX_NODES or (frames and frames[-1][1] > MAX_NODES):
            raise AmnesiaError(
                f"{source} line {_line(event)}: its aliases expand to more than "
                f"{MAX_NODES:,} values: not a config this tool reads"
            )
    try:
        value = yaml.load(text, Loader=_YAML_LOADER)
    except RecursionError:
        raise AmnesiaError(f"{source} is nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as e:  # a constructor's own conversion (a timestamp out of range...)
        raise AmnesiaError(f"{source}: {_cut(str(e))}") from None
    check_tree(value, source)
    return value


# ---- schemas of the JSON files read from model directories ------------------------------------

Check = tuple[str, Callable[[Any], bool]]


def _is_int(v: Any, lo: int = -(2**31) + 1, hi: int = 2**31 - 1) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


INT: Check = ("an integer", _is_int)
SIZE: Check = ("an integer >= 0", lambda v: _is_int(v, 0))
NUMBER: Check = ("a finite number", _is_number)
STR: Check = ("a string", lambda v: isinstance(v, str))
BOOL: Check = ("true or false", lambda v: isinstance(v, bool))
SIZES: Check = ("a list of integers >= 0", lambda v: isinstance(v, list) and all(_is_int(x, 0) for x in v))
SIZE_OR_SIZES: Check = (
    "an integer >= 0, a list of them, or null",
    lambda v: v is None or _is_int(v, 0) or SIZES[1](v),
)


def optional(check: Check) -> Check:
    return (f"{check[0]} or null", lambda v: v is None or check[1](v))


def one_of(*choices: str) -> Check:
    return (f"one of {', '.join(choices)}", lambda v: v in choices)


def check_fields(value: Any, fields: Mapping[str, Check], path: Path | str, where: str = "") -> None:
    """``value`` must be a JSON object; each key of ``fields`` it holds must pass its check."""
    if not isinstance(value, dict):
        at = f"{where} " if where else ""
        raise AmnesiaError(f"{path}: {at}must be a JSON object, got {short(value)}; recreate the file")
    for key, (what, ok) in fields.items():
        if key in value and not ok(value[key]):
            raise AmnesiaError(f"{path}: {_key(where, key)} must be {what}, got {short(value[key])}")


MODEL_CONFIG: dict[str, Check] = {
    "family": STR,
    "image_size": SIZE,
    "channels": SIZE,
    "num_classes": SIZE,
    "hidden_dims": SIZES,
    "latent_dim": SIZE,
    "block_out_channels": SIZES,
    "layers_per_block": SIZE,
    "attention_levels": (
        "a list of true/false",
        lambda v: isinstance(v, list) and all(isinstance(a, bool) for a in v),
    ),
    "attention_head_dim": optional(SIZE),
    "dropout": NUMBER,
    "norm_num_groups": SIZE,
    "num_train_timesteps": ("an integer in [1, 100000]", lambda v: _is_int(v, 1, MAX_TIMESTEPS)),
    "beta_start": NUMBER,
    "beta_end": NUMBER,
    "beta_schedule": STR,
    "class_dropout_prob": NUMBER,
    "sampler": STR,
    "num_inference_steps": SIZE,
    "guidance_scale": NUMBER,
    "guidance_convention": STR,
    "eta": NUMBER,
    "settings_hash": STR,
}


def check_model_config(value: Any, path: Path) -> None:
    """A cvae/ddpm ``config.json``: field types, then its size (before anything is allocated)."""
    check_fields(value, MODEL_CONFIG, path)
    family = declared_family(value.get("family"))
    if family is not None and family.size is not None:
        check_model_size(family.name, value, str(path), weights_dir=path.parent)


def _config_json(value: Any, path: Path) -> None:
    # config.json is a cvae/ddpm model's marker, a run's config, or a diffusers component's config
    family = declared_family(value.get("family")) if isinstance(value, dict) else None
    if family is not None and family.size is not None:
        check_model_config(value, path)


SCHEDULER_CONFIG: dict[str, Check] = {
    "num_train_timesteps": ("an integer in [1, 100000]", lambda v: _is_int(v, 1, MAX_TIMESTEPS)),
    "beta_start": NUMBER,
    "beta_end": NUMBER,
    "beta_schedule": one_of("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid"),
    "trained_betas": optional(
        ("a list of numbers", lambda v: isinstance(v, list) and all(_is_number(b) for b in v))
    ),
    "prediction_type": one_of("epsilon", "v_prediction", "sample"),
    "steps_offset": SIZE,
    "clip_sample": BOOL,
    "clip_sample_range": NUMBER,
    "set_alpha_to_one": BOOL,
    "skip_prk_steps": BOOL,
    "thresholding": BOOL,
    "dynamic_thresholding_ratio": NUMBER,
    "sample_max_value": NUMBER,
    "rescale_betas_zero_snr": BOOL,
    "timestep_spacing": one_of("linspace", "leading", "trailing"),
    "variance_type": optional(STR),
    "_class_name": STR,
}


def check_scheduler_config(value: Any, path: Path) -> None:
    """Types, then the noise schedule itself: every beta finite and in (0, 1), rising where it must."""
    check_fields(value, SCHEDULER_CONFIG, path)
    trained = value.get("trained_betas")
    if trained is not None:
        bad = [b for b in trained if not 0 < b < 1]
        if not trained or bad:
            raise AmnesiaError(
                f"{path}: trained_betas must be numbers in (0, 1), got {short(bad or trained)}"
            )
        return
    schedule = value.get("beta_schedule", "linear")
    if schedule == "squaredcos_cap_v2":  # computed from the timestep count alone, capped below 1
        return
    start, end = value.get("beta_start", 0.0001), value.get("beta_end", 0.02)
    if not 0 < start <= end < 1:  # linear, scaled_linear and sigmoid all rise from beta_start to beta_end
        raise AmnesiaError(
            f"{path}: the {schedule} schedule needs 0 < beta_start <= beta_end < 1, got beta_start "
            f"{short(start)}, beta_end {short(end)}"
        )


_CORE_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "text_encoder_2", "tokenizer_2")
_PIPELINE_FLAGS = ("requires_safety_checker", "force_zeros_for_empty_prompt", "requires_aesthetics_score")
# diffusers component configs: the keys that size tensors must be sizes (a string sample_size would
# reach the UNet's constructor)
COMPONENT_CONFIG: dict[str, Check] = {
    key: SIZE_OR_SIZES
    for key in (
        "sample_size",
        "in_channels",
        "out_channels",
        "layers_per_block",
        "block_out_channels",
        "cross_attention_dim",
        "attention_head_dim",
        "num_attention_heads",
        "norm_num_groups",
        "latent_channels",
        "transformer_layers_per_block",
        "addition_time_embed_dim",
        "projection_class_embeddings_input_dim",
        "encoder_hid_dim",
        "time_embedding_dim",
        "num_class_embeds",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "vocab_size",
        "max_position_embeddings",
        "projection_dim",
    )
}


def check_model_index(value: Any, path: Path) -> None:
    """A diffusers ``model_index.json``: components are [library, class] pairs; the configs of those
    present in the directory are checked too, and their weights' sizes against free memory."""
    flags: dict[str, Check] = {k: BOOL for k in _PIPELINE_FLAGS}
    meta_check: Check = ("a JSON object", lambda v: isinstance(v, dict))
    check_fields(
        value,
        {"_class_name": STR, "_diffusers_version": STR, "_selective_amnesia": meta_check, **flags},
        path,
    )
    meta = value.get("_selective_amnesia")
    if meta is not None:
        sampler = {"sampler": STR, "num_inference_steps": SIZE, "guidance_scale": NUMBER}
        check_fields(meta, sampler, path, "_selective_amnesia")
    parameters = 0
    for name, entry in value.items():
        if name.startswith("_") or name in _PIPELINE_FLAGS:
            continue
        if (entry is None or isinstance(entry, bool)) and name not in _CORE_COMPONENTS:
            continue  # a pipeline flag or an absent optional part (SDXL's add_watermarker: null)
        if not name.isidentifier():  # a folder name: nothing outside the pipeline directory
            raise AmnesiaError(f"{path}: {_key('', name)} is not a component name; recreate the file")
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and all(e is None or isinstance(e, str) for e in entry)
        ):
            raise AmnesiaError(f"{path}: {name} must be a [library, class] pair, got {short(entry)}")
        folder = path.parent / name
        if entry[1] is None or not folder.is_dir():
            continue
        if (folder / "config.json").is_file():
            read_json(folder / "config.json", lambda v, p: check_fields(v, COMPONENT_CONFIG, p))
        if (folder / "scheduler_config.json").is_file():  # before any weights are loaded
            read_json(folder / "scheduler_config.json")
        parameters += sum(safetensors_numel(f) for f in sorted(folder.glob("*.safetensors")))
    check_memory(parameters, str(path))


def check_text_encoder_ref(value: Any, path: Path) -> None:
    """``text_encoder_ref.json``: strings, and a package that is installed as files (a built-in or
    frozen module has no folder: its "folder" would be the current directory)."""
    import importlib.util

    check_fields(value, {"package": STR, "subdir": STR, "class": STR}, path)
    package = value.get("package", "")
    if isinstance(package, str) and package.isidentifier():  # top-level: finding it imports nothing
        spec = importlib.util.find_spec(package)
        if spec is not None and not (
            spec.submodule_search_locations and spec.origin and Path(spec.origin).is_file()
        ):
            raise AmnesiaError(f"{path}: package {short(package)} is not an installed package with files")


_NAMED_SCHEMAS: dict[str, Callable[[Any, Path], None]] = {
    "text_encoder_ref.json": check_text_encoder_ref,
    "config.json": _config_json,
    "scheduler_config.json": check_scheduler_config,
    "model_index.json": check_model_index,
}


# ---- sizes before allocation -------------------------------------------------------------------


def free_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_memory(parameters: int, source: str, extra_bytes: int = 0) -> None:
    """Refuse a model of more than ``MAX_PARAMETERS``, or whose float32 weights (plus ``extra_bytes``)
    do not fit in the free memory, before it is built."""
    if parameters > MAX_PARAMETERS:
        raise AmnesiaError(
            f"{source} describes a model of {parameters:,} parameters, more than the {MAX_PARAMETERS:,} "
            "this tool loads: check its sizes"
        )
    need, free = parameters * 4 + extra_bytes, free_memory()
    if free is not None and need > free:
        raise AmnesiaError(
            f"{source} describes a model of {parameters:,} parameters: {gib(need)} as float32, more than "
            f"the {gib(free)} of memory free; check its sizes, or free memory"
        )


def safetensors_numel(path: Path) -> int:
    """The number of values a safetensors file holds, from its header alone (nothing is loaded)."""
    with open(path, "rb") as f:
        head = f.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < length <= 100 * 2**20:
            raise AmnesiaError(f"{path} is not a readable safetensors file (bad header length); recreate it")
        header = f.read(length)
    try:
        entries = parse_json(header.decode("utf-8"), str(path))
    except (UnicodeDecodeError, AmnesiaError):
        raise AmnesiaError(f"{path} is not a readable safetensors file (bad header); recreate it") from None
    total = 0
    for name, entry in entries.items() if isinstance(entries, dict) else []:
        if name == "__metadata__":
            continue
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(_is_int(d, 0, 2**62) for d in shape)):
            raise AmnesiaError(
                f"{path} is not a readable safetensors file ({_cut(str(name), 60)}); recreate it"
            )
        total += math.prod(shape)
    return total


def check_model_size(
    family: str, fields: Mapping[str, Any], source: str, weights_dir: Path | None = None
) -> None:
    """A cvae/ddpm config's parameter count, from the config alone: bounded, compared with the weights'
    safetensors header in ``weights_dir`` when there is one, and with the free memory. The family's
    ``size`` and ``weights_file`` (``selective_amnesia.families``) say how."""
    entry = get_family(family)
    if entry.size is None:
        return
    size = entry.size(fields, source)
    if size is None:  # settings that make no config: reported, with the reason, where it is built
        return
    parameters, extra = size
    weights = weights_dir / entry.weights_file if weights_dir and entry.weights_file else None
    check_memory(parameters, source, extra)
    if weights is not None and weights.is_file():
        stored = safetensors_numel(weights)
        if stored != parameters:
            raise AmnesiaError(
                f"{source} describes {parameters:,} weights but {weights} holds {stored:,}: they do not "
                "match; recreate the model"
            )


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, Any]) -> None:
    """Save tensors as safetensors; metadata values are stored as JSON strings."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        try:
            save_file(contiguous, str(tmp), metadata=meta)
        except SafetensorError as e:  # an I/O failure (full disk...) surfaces as OSError with its errno
            found = re.search(r"os error (\d+)", str(e))
            if found is None:
                raise
            code = int(found.group(1))
            raise OSError(code, os.strerror(code), str(path)) from None


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load a safetensors file and its metadata (as strings); corrupt files raise ``AmnesiaError``."""
    path = Path(path)
    if not path.is_file():
        raise AmnesiaError(f"{path} not found")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise AmnesiaError(f"{path} is not a readable safetensors file ({e}); recreate it") from None


def cached_tensor(
    path: Path | None, key: str, name: str, make: Callable[[], torch.Tensor], *, save: bool = True
) -> tuple[torch.Tensor, bool]:
    """The tensor ``name`` stored at ``path`` under ``key``, else ``make()`` (stored there when ``save``).

    Returns the tensor and whether it was made now. A file saved under another key is replaced.
    """
    if path is not None and path.is_file():
        stored, meta = load_tensors(path)
        if meta.get("key") == key and name in stored:
            return stored[name], False
    tensor = make()
    if path is not None and save:
        save_tensors(path, {name: tensor.contiguous()}, {"key": key})
    return tensor, True


def state_hash(state: Mapping[str, torch.Tensor]) -> str:
    """A short content hash of a state dict (names, shapes, dtypes and values)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC", "Intel(R) Xeon(R) Processor"), else the architecture."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment() -> dict[str, str]:
    """Package versions and the machine, written into every output. The machine matters for timings:
    the same run took 1.6 s a step on one 2-core box with AVX-512 and 3.1 s on another with AVX2 only
    (docs/robustness.md, sessions 25-26), so a wall time means little without the CPU it ran on."""
    import numpy
    import safetensors

    import selective_amnesia

    return {
        "selective_amnesia": selective_amnesia.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the kernels torch picked: AVX512, AVX2
        "cpu_count": str(os.cpu_count()),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }
