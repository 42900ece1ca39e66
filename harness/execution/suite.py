"""Suites: YAML files naming the grid method x dataset x seed (x budget) and the protocols.

Shipped suites live in ``harness/suites/``; a user may pass a path to their own file.
Everything is validated before any training: one bad name or key stops the run with one
line naming it and the valid choices.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from harness.models.backbones import BACKBONES
from harness.engine.budget import Budget
from harness.data.datasets import ImageData, SplitManifest, validate_dataset_name
from harness.errors import UsageError, choices_error
from harness.execution.executors import check_slurm_options
from harness.execution.validate import (MAX_IMAGE_SIZE, SEED_LIMIT, check_unique, coerce_like, is_seed,
                                       number_in_range, parse_number)
from methods import METHODS, resolve_config
from protocols import PROTOCOLS
from protocols._common import check_count, check_positive, check_positive_int

SUITES_DIR = Path(__file__).parents[1] / "suites"
DEFAULT_SUITE = "quick"

TOP_KEYS = {"name", "description", "scale", "backbone", "datasets", "methods", "seeds", "budget",
            "protocols", "val_fraction", "deterministic", "train_split", "tables", "slurm", "image_size"}
METHOD_KEYS = {"name", "as", "config", "dataset_config", "backbone", "protocols"}
SPLITS = ("train", "train_full", "all")
#: A suite's name is a folder under results/ and the stem of its tables: no separators, no leading dot.
SUITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SUITE_NAME_MAX = 100  # file names of its tables (<name>-transfer.html, ...) stay far below 255 bytes


@dataclass(frozen=True)
class MethodEntry:
    name: str
    label: str
    config: dict[str, Any]
    dataset_config: dict[str, dict[str, Any]]
    backbone: str | None = None
    #: Per-method protocol parameters over the suite's (MoCo's kNN at its own temperature, say).
    protocols: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Suite:
    name: str
    description: str
    scale: str
    backbone: str
    datasets: list[str]
    methods: list[MethodEntry]
    seeds: list[int]
    budgets: list[Budget]
    protocols: dict[str, dict[str, Any]]
    val_fraction: float = 0.1
    deterministic: bool = True
    train_split: str = "train"
    tables: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    #: Side in pixels every training view and evaluation input is resized to (CC and CD train
    #: ResNet-34 at 224 px on 32 px CIFAR); None: the dataset's own size, and no entry in the run spec.
    image_size: int | None = None


def shipped_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def _suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except OSError:  # a name too long for a file name: no such file, and no shipped suite either
        is_file = is_dir = False
    if path.suffix in (".yaml", ".yml") or is_file:
        if not is_file:
            raise UsageError(f"suite file {name_or_path!r} " + ("is a directory" if is_dir else "does not exist"))
        return path
    suites = shipped_suites()
    if name_or_path not in suites:
        raise choices_error("suite", name_or_path, suites)
    return suites[name_or_path]


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)


def is_suite_name(name: Any) -> bool:
    """Whether ``name`` can name a results folder and the tables: see :func:`check_suite_name`."""
    return isinstance(name, str) and SUITE_NAME.fullmatch(name) is not None and len(name) <= SUITE_NAME_MAX


def check_suite_name(name: Any, where: str = "", hint: str = "") -> None:
    """A suite name is a folder under the results dir and the stem of its tables: no separators, no leading dot ('..')."""
    _expect(is_suite_name(name),
            f"{where}the suite name {name!r} must be letters, digits, '.', '_' or '-', at most {SUITE_NAME_MAX} of "
            f"them (it names the results folder and the tables){hint}")


def _check_k_list(value: Any, name: str) -> None:
    """A sweep of ``k`` lists at least one value (``k: []`` would score nothing after training), and a number given
    is at least 1 (val_knn clamps its ``k`` to its split instead of having it checked against it); each value is
    checked against the data's split sizes later."""
    if isinstance(value, (list, tuple)) and not value:
        raise ValueError(f"{name} must be a positive integer or a non-empty list of them, got {list(value)!r}")
    for k in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(k, (int, float)) and not isinstance(k, bool) and k < 1:
            raise ValueError(f"{name} must be a positive integer or a non-empty list of them, got {value!r}")


def _in_range(low: float | None, high: float | None) -> Callable[[Any, str], None]:
    """:func:`number_in_range` as a parameter check: a rate that may be 0 (a probe's weight decay, k-means'
    tolerance), a coefficient in [0, 1] (a probe's SGD momentum, as a method's)."""
    return lambda value, name: number_in_range(value, low, high, name)


def _each(check: Callable[[Any, str], None], non_empty: bool = False) -> Callable[[Any, str], None]:
    """``check`` on every element of a grid (``l2_grid``, ``grid_k``); ``non_empty``: one the protocol sweeps to pick
    its value, so an empty grid picks nothing."""
    def check_all(values: Any, name: str) -> None:
        if non_empty and not values:
            raise ValueError(f"{name} must be a non-empty list, got {values!r}")
        for i, value in enumerate(values):
            check(value, f"value {i} of {name}")

    return check_all


#: Checks of protocol parameters that need no data, by parameter name, with the protocols' own
#: checks (``protocols/_common.py``): what evaluation would reject after training, rejected before it.
PARAMETER_CHECKS: dict[str, Callable[[Any, str], None]] = {
    "temperature": check_positive, "lr": check_positive, "max_iter": check_positive_int,
    "n_init": check_positive_int, "epochs": check_positive_int, "batch_size": check_positive_int, "k": _check_k_list,
    "weight_decay": _in_range(0, None), "momentum": _in_range(0, 1), "tol": _in_range(0, None),
    "l2_grid": _each(check_positive, non_empty=True), "grid_k": _each(check_positive_int),
    "grid_temperature": _each(check_positive),
}


def _protocol_params(pname: str, params: Any, where: str) -> dict[str, Any]:
    """``params`` for protocol ``pname``, checked against the protocol's declared parameters."""
    spec = PROTOCOLS.get(pname)
    _expect(params is None or isinstance(params, dict), f"{where}: parameters of protocol {pname!r} must be a mapping")
    params = dict(params or {})
    bad = sorted(map(str, set(params) - set(spec.defaults)))
    _expect(not bad, f"{where}: unknown parameter {bad[:1]} for protocol {pname!r} "
                     f"(valid: {', '.join(sorted(spec.defaults)) or 'none'})")
    params = {key: coerce_like(value, spec.defaults[key], f"{where}: parameter {key!r} of protocol {pname!r}")
              for key, value in params.items()}
    for key, value in params.items():
        if key in spec.choices and value not in spec.choices[key]:
            raise UsageError(f"{where}: parameter {key!r} of protocol {pname!r} is {value!r} "
                             f"(valid: {', '.join(sorted(spec.choices[key]))})")
        if key in PARAMETER_CHECKS:
            try:
                PARAMETER_CHECKS[key](value, f"parameter {key!r} of protocol {pname!r}")
            except ValueError as exc:
                raise UsageError(f"{where}: {exc}") from None
    return params


def _method_entries(raw: Any, where: str) -> list[MethodEntry]:
    if raw == "all":
        return [MethodEntry(n, n, {}, {}) for n in METHODS.names()]
    _expect(isinstance(raw, list) and raw, f"{where}: 'methods' must be 'all' or a non-empty list")
    entries = []
    for item in raw:
        if isinstance(item, str):
            item = {"name": item}
        _expect(isinstance(item, dict) and isinstance(item.get("name"), str),
                f"{where}: each method must be a name or a mapping with a 'name' string, got {item!r}")
        unknown = sorted(map(str, set(item) - METHOD_KEYS))
        _expect(not unknown, f"{where}: unknown key {unknown[:1]} in method entry "
                             f"(valid: {', '.join(sorted(METHOD_KEYS))})")
        METHODS.get(item["name"])
        if item.get("backbone") is not None:
            BACKBONES.get(item["backbone"])
        overrides = item.get("protocols") or {}
        _expect(isinstance(overrides, dict), f"{where}: a method's 'protocols' must map protocol names to parameters")
        label = item.get("as", item["name"])
        _expect(isinstance(label, str) and label.strip() and label.isprintable() and not {"|", ","} & set(label),
                f"{where}: 'as' of method {item['name']!r} must be a non-empty string on one line without '|' (the "
                f"row's label in every table) or ',' (--methods LABEL,LABEL picks rows), got {label!r}")
        config, per_dataset = item.get("config") or {}, item.get("dataset_config") or {}
        _expect(isinstance(config, dict), f"{where}: 'config' of method {label!r} must map config keys to values, "
                                          f"got {config!r}")
        _expect(isinstance(per_dataset, dict) and all(isinstance(c, dict) for c in per_dataset.values()),
                f"{where}: 'dataset_config' of method {label!r} must map dataset names to config mappings, "
                f"got {per_dataset!r}")
        entries.append(MethodEntry(item["name"], label, dict(config), dict(per_dataset), item.get("backbone"),
                                   {p: _protocol_params(p, params, where) for p, params in overrides.items()}))
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    _expect(not dup, f"{where}: method row {dup[:1]} appears twice; give one an 'as' label")
    return entries


def parse_suite(data: Any, name: str, source: str = "") -> Suite:
    """Validate a suite mapping and build a :class:`Suite`."""
    where = f"suite {name!r}"
    _expect(isinstance(data, dict), f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(map(str, set(data) - TOP_KEYS))
    _expect(not unknown, f"{where}: unknown key {unknown[:1]} (valid: {', '.join(sorted(TOP_KEYS))})")
    suite_name = data.get("name", name)
    check_suite_name(suite_name, f"{where}: ", "; set 'name:'")
    if suite_name != name:  # errors name the suite as its tables do, and the file it came from
        where = f"suite {suite_name!r} ({Path(source).name if source else name})"
    for key in ("datasets", "methods", "seeds", "budget", "protocols"):
        _expect(key in data, f"{where}: missing required key {key!r}")
    scale = data.get("scale", "cpu")
    _expect(scale in ("cpu", "paper"), f"{where}: unknown scale {scale!r} (valid: cpu, paper)")
    backbone = data.get("backbone", "small_cnn")
    BACKBONES.get(backbone)
    datasets = data["datasets"]
    _expect(isinstance(datasets, list) and datasets, f"{where}: 'datasets' must be a non-empty list")
    for d in datasets:
        validate_dataset_name(str(d))
    check_unique([str(d) for d in datasets], f"{where}: 'datasets'")
    seeds = data["seeds"]
    _expect(isinstance(seeds, list) and seeds and all(map(is_seed, seeds)),
            f"{where}: 'seeds' must be a non-empty list of integers in [0, {SEED_LIMIT}), got {seeds!r}")
    check_unique(seeds, f"{where}: 'seeds'")
    budgets_raw = data["budget"] if isinstance(data["budget"], list) else [data["budget"]]
    _expect(bool(budgets_raw), f"{where}: 'budget' must be a budget or a non-empty list of them")
    budgets = [Budget.parse(b) for b in budgets_raw]
    check_unique([str(b) for b in budgets], f"{where}: 'budget'")
    protocols = data["protocols"]
    _expect(isinstance(protocols, dict) and protocols, f"{where}: 'protocols' must be a non-empty mapping")
    resolved = {pname: {**PROTOCOLS.get(pname).defaults, **_protocol_params(pname, params, where)}
                for pname, params in protocols.items()}
    split = data.get("train_split", "train")
    _expect(split in SPLITS, f"{where}: unknown train_split {split!r} (valid: {', '.join(SPLITS)})")
    vf = data.get("val_fraction", 0.1)  # YAML reads 1e-1 as the string '1e-1': taken as its number, as config values
    number = parse_number(vf)
    _expect(number is not None and 0 <= number < 1, f"{where}: val_fraction must be in [0, 1), got {vf!r}")
    vf = number
    _expect(vf > 0 or "val_knn" not in resolved,
            f"{where}: protocol val_knn scores the validation split, which val_fraction 0 leaves empty "
            f"(valid: val_fraction in (0, 1))")
    image_size = data.get("image_size")
    side = None if image_size is None else parse_number(image_size)  # 2.24e2 (a string to YAML) or 224.0: 224
    _expect(image_size is None or (side is not None and float(side).is_integer() and 0 < side <= MAX_IMAGE_SIZE),
            f"{where}: image_size must be an integer from 1 to {MAX_IMAGE_SIZE} (pixels per side) or absent for the "
            f"dataset's own size, got {image_size!r}")
    image_size = None if side is None else int(side)
    tables = data.get("tables") or {}
    _expect(isinstance(tables, dict) and all(isinstance(k, str) and SUITE_NAME.fullmatch(k) and isinstance(v, list)
                                             and v and all(isinstance(p, str) and p for p in v)
                                             for k, v in tables.items()),
            f"{where}: 'tables' must map a table name to a non-empty list of metric prefixes, got {tables!r}")
    for table, prefixes in tables.items():  # metrics are named <protocol>/<metric>
        for prefix in prefixes:
            _expect(any(prefix.startswith(f"{p}/") or f"{p}/".startswith(prefix) for p in resolved),
                    f"{where}: table {table!r} claims metrics {prefix!r}, which no protocol of the suite writes "
                    f"(metrics are <protocol>/<name>; protocols: {', '.join(resolved)})")
    claimed = [p for prefixes in tables.values() for p in prefixes]
    _expect(not resolved or any(not any(f"{p}/".startswith(c) for c in claimed) for p in resolved),
            f"{where}: 'tables' claims the metrics of every protocol, which leaves the main table empty; "
            f"keep at least one protocol's metrics out of them")
    methods = _method_entries(data["methods"], where)
    deterministic = data.get("deterministic", True)
    _expect(isinstance(deterministic, bool), f"{where}: deterministic must be true or false, got {deterministic!r}")
    slurm = check_slurm_options(data["slurm"], f"{where}: slurm") if data.get("slurm") is not None else {}
    for entry in methods:
        unknown_data = sorted(map(str, set(entry.dataset_config) - {str(d) for d in datasets}))
        _expect(not unknown_data, f"{where}: method {entry.label!r} has a dataset_config for {unknown_data[:1]}, "
                                  f"which the suite does not run (datasets: {', '.join(map(str, datasets))})")
        extra = sorted(set(entry.protocols) - set(resolved))
        _expect(not extra, f"{where}: method {entry.label!r} sets protocol {extra[:1]} that the suite does not run "
                           f"(suite protocols: {', '.join(resolved)})")
    for entry in methods:  # configs are checked now, not after hours of training
        for overrides in [{}, *entry.dataset_config.values()]:
            try:
                resolve_config(METHODS.get(entry.name), scale, {**entry.config, **overrides})
            except UsageError as exc:
                raise UsageError(f"{where}: {exc}") from None
    description = data.get("description") or ""
    _expect(isinstance(description, str), f"{where}: description must be text, got {description!r}")
    return Suite(suite_name, description, scale, backbone,
                 [str(d) for d in datasets], methods, seeds, budgets, resolved, float(vf),
                 deterministic, split, {str(k): v for k, v in tables.items()}, source,
                 {"slurm": slurm} if slurm else {}, image_size)


class _SuiteLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently: a
    second ``seeds:`` or ``lr:`` would quietly replace the first)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *defaults': merged keys may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                twice = key in seen
                seen.add(key)
            except TypeError:  # an unhashable key: the safe loader's own error names it
                continue
            if twice:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping",
                                                        key_node.start_mark)
        return super().construct_mapping(node, deep)


def _refers_to_itself(value: Any) -> bool:
    """Whether ``value`` (what YAML built) contains itself: ``a: &x [*x]`` is a list holding that list, which every
    check below would walk forever (a RecursionError). Aliases shared without a cycle are fine; each mapping or list
    is walked once, so a file of many aliases of aliases costs no more than its distinct nodes."""
    done: set[int] = set()

    def walk(node: Any, ancestors: set[int]) -> bool:
        if not isinstance(node, (dict, list)) or id(node) in done:
            return False
        if id(node) in ancestors:
            return True
        ancestors.add(id(node))
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        if any(walk(child, ancestors) for child in children):
            return True
        ancestors.discard(id(node))
        done.add(id(node))
        return False

    return walk(value, set())


def load_suite(name_or_path: str) -> Suite:
    """Load a shipped suite by name or a user's YAML file by path."""
    path = _suite_path(name_or_path)
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_SuiteLoader)
        cyclic = _refers_to_itself(data)
    except RecursionError:  # PyYAML's parser, and the walk, recurse once per level of nesting
        raise UsageError(f"suite file {str(path)!r} nests lists or mappings hundreds of levels deep; a suite needs "
                         f"a few") from None
    except UnicodeDecodeError as exc:
        raise UsageError(f"suite file {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"suite file {str(path)!r} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    if cyclic:
        raise UsageError(f"suite file {str(path)!r} has an alias inside its own anchor (such as `k: &a [*a]`), a value "
                         f"that contains itself; give the value itself")
    return parse_suite(data, path.stem, str(path))


def _protocol_needs(pname: str, params: dict[str, Any]) -> tuple[str | None, list[int], bool]:
    """What protocol ``pname`` draws from the data (``protocols/*.py``): the split its samples and ``k``
    neighbours or clusters come from (None: nothing to check), its ``k`` values, and whether it reads
    coarse labels."""
    if pname in ("knn", "coarse_to_fine"):  # train+val vote for the test samples
        return "train_full", [params["k"]], pname == "coarse_to_fine"
    if pname == "clustering":  # k: None (the number of classes), an int or a sweep of ints
        k = params["k"]
        return params["split"], [] if k is None else list(k) if isinstance(k, (list, tuple)) else [k], params["coarse"]
    return None, [], False


def check_against_data(suite: Suite, load: Callable[[str, float], tuple[ImageData, SplitManifest]],
                       datasets: set[str] | None = None) -> None:
    """Check, before any training, what only the loaded data can tell: each protocol's ``k`` against the
    size of the split it draws from, and coarse labels wherever a protocol or a method reads them.

    ``load(dataset, val_fraction)`` gives the data and its split manifest (loading is where corrupt,
    missing or mixed-size data is caught too). ``datasets``: only these of the suite's (those with
    runs left to do; a fully stored suite needs no data); default all.
    """
    for dataset in [d for d in suite.datasets if datasets is None or d in datasets]:
        data, manifest = load(dataset, suite.val_fraction)
        if data.num_classes < 2:  # every protocol scores labels: one class fails it after training
            raise UsageError(f"suite {suite.name!r}: dataset {dataset} has {data.num_classes} class "
                             f"({', '.join(map(repr, data.classes))}); the protocols need at least 2 classes")
        for entry in suite.methods:
            where = f"suite {suite.name!r}: {entry.label} on {dataset}"
            needs = {pname: _protocol_needs(pname, {**params, **entry.protocols.get(pname, {})})
                     for pname, params in suite.protocols.items()}
            readers = ([f"method {entry.name!r}"] if METHODS.get(entry.name).label_level == "coarse" else []) + \
                [f"protocol {pname!r}" for pname, (_, _, coarse) in needs.items() if coarse]
            if readers and data.coarse_labels is None:
                raise UsageError(f"{where}: {readers[0]} reads coarse labels, which this dataset does not have; "
                                 f"leave it out for this dataset")
            for pname, (split, ks, _) in needs.items():
                try:
                    size = 0 if split is None else len(manifest.split(split))  # an unknown split name fails here
                    for k in ks:
                        check_count(k, size, f"{pname} k", f"the {split} split of {dataset}")
                except ValueError as exc:
                    raise UsageError(f"{where}: {exc}") from None
