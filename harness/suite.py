"""Suites: YAML files naming the grid method x dataset x seed (x budget) and the protocols.

Shipped suites live in ``harness/suites/``; a user may pass a path to their own file.
Everything is validated before any training: one bad name or key stops the run with one
line naming it and the valid choices.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from harness.backbones import BACKBONES
from harness.budget import Budget
from harness.data import validate_dataset_name
from harness.errors import UsageError, choices_error
from methods import METHODS, resolve_config
from protocols import PROTOCOLS

SUITES_DIR = Path(__file__).parent / "suites"
DEFAULT_SUITE = "quick"

TOP_KEYS = {"name", "description", "scale", "backbone", "datasets", "methods", "seeds", "budget",
            "protocols", "val_fraction", "deterministic", "train_split", "tables", "slurm"}
METHOD_KEYS = {"name", "as", "config", "dataset_config", "backbone", "protocols"}
SPLITS = ("train", "train_full", "all")


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


def shipped_suites() -> dict[str, Path]:
    return {p.stem: p for p in sorted(SUITES_DIR.glob("*.yaml"))}


def _suite_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        if not path.is_file():
            raise UsageError(f"suite file {name_or_path!r} does not exist")
        return path
    suites = shipped_suites()
    if name_or_path not in suites:
        raise choices_error("suite", name_or_path, suites)
    return suites[name_or_path]


def _expect(cond: bool, message: str) -> None:
    if not cond:
        raise UsageError(message)


def _protocol_params(pname: str, params: Any, where: str) -> dict[str, Any]:
    """``params`` for protocol ``pname``, checked against the protocol's declared parameters."""
    spec = PROTOCOLS.get(pname)
    _expect(params is None or isinstance(params, dict), f"{where}: parameters of protocol {pname!r} must be a mapping")
    params = dict(params or {})
    bad = sorted(set(params) - set(spec.defaults))
    _expect(not bad, f"{where}: unknown parameter {bad[:1]} for protocol {pname!r} "
                     f"(valid: {', '.join(sorted(spec.defaults)) or 'none'})")
    return params


def _method_entries(raw: Any, where: str) -> list[MethodEntry]:
    if raw == "all":
        return [MethodEntry(n, n, {}, {}) for n in METHODS.names()]
    _expect(isinstance(raw, list) and raw, f"{where}: 'methods' must be 'all' or a non-empty list")
    entries = []
    for item in raw:
        if isinstance(item, str):
            item = {"name": item}
        _expect(isinstance(item, dict) and "name" in item, f"{where}: each method must be a name or a mapping with 'name'")
        unknown = sorted(set(item) - METHOD_KEYS)
        _expect(not unknown, f"{where}: unknown key {unknown[:1]} in method entry "
                             f"(valid: {', '.join(sorted(METHOD_KEYS))})")
        METHODS.get(item["name"])
        if item.get("backbone") is not None:
            BACKBONES.get(item["backbone"])
        overrides = item.get("protocols") or {}
        _expect(isinstance(overrides, dict), f"{where}: a method's 'protocols' must map protocol names to parameters")
        entries.append(MethodEntry(item["name"], str(item.get("as", item["name"])), dict(item.get("config") or {}),
                                   dict(item.get("dataset_config") or {}), item.get("backbone"),
                                   {p: _protocol_params(p, params, where) for p, params in overrides.items()}))
    labels = [e.label for e in entries]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    _expect(not dup, f"{where}: method row {dup[:1]} appears twice; give one an 'as' label")
    return entries


def parse_suite(data: Any, name: str, source: str = "") -> Suite:
    """Validate a suite mapping and build a :class:`Suite`."""
    where = f"suite {name!r}"
    _expect(isinstance(data, dict), f"{where}: expected a mapping at the top level, got {type(data).__name__}")
    unknown = sorted(set(data) - TOP_KEYS)
    _expect(not unknown, f"{where}: unknown key {unknown[:1]} (valid: {', '.join(sorted(TOP_KEYS))})")
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
    seeds = data["seeds"]
    _expect(isinstance(seeds, list) and seeds and all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds),
            f"{where}: 'seeds' must be a non-empty list of non-negative integers, got {seeds!r}")
    budgets_raw = data["budget"] if isinstance(data["budget"], list) else [data["budget"]]
    budgets = [Budget.parse(b) for b in budgets_raw]
    protocols = data["protocols"]
    _expect(isinstance(protocols, dict) and protocols, f"{where}: 'protocols' must be a non-empty mapping")
    resolved = {pname: {**PROTOCOLS.get(pname).defaults, **_protocol_params(pname, params, where)}
                for pname, params in protocols.items()}
    split = data.get("train_split", "train")
    _expect(split in SPLITS, f"{where}: unknown train_split {split!r} (valid: {', '.join(SPLITS)})")
    vf = data.get("val_fraction", 0.1)
    _expect(isinstance(vf, (int, float)) and 0 <= vf < 1, f"{where}: val_fraction must be in [0, 1), got {vf!r}")
    tables = data.get("tables") or {}
    _expect(isinstance(tables, dict) and all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                             for v in tables.values()),
            f"{where}: 'tables' must map a table name to a list of metric prefixes, got {tables!r}")
    methods = _method_entries(data["methods"], where)
    for entry in methods:
        extra = sorted(set(entry.protocols) - set(resolved))
        _expect(not extra, f"{where}: method {entry.label!r} sets protocol {extra[:1]} that the suite does not run "
                           f"(suite protocols: {', '.join(resolved)})")
    for entry in methods:  # config keys are checked now, not after hours of training
        resolve_config(METHODS.get(entry.name), scale, entry.config)
        for overrides in entry.dataset_config.values():
            resolve_config(METHODS.get(entry.name), scale, {**entry.config, **overrides})
    return Suite(str(data.get("name", name)), str(data.get("description", "")), scale, backbone,
                 [str(d) for d in datasets], methods, seeds, budgets, resolved, float(vf),
                 bool(data.get("deterministic", True)), split, {str(k): v for k, v in tables.items()}, source,
                 {"slurm": data["slurm"]} if data.get("slurm") else {})


def load_suite(name_or_path: str) -> Suite:
    """Load a shipped suite by name or a user's YAML file by path."""
    path = _suite_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise UsageError(f"suite file {str(path)!r} is not valid YAML{at}: {getattr(exc, 'problem', exc)}") from None
    return parse_suite(data, path.stem, str(path))
