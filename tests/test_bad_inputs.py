"""Every bad input of issue 13 through the command line: exit code, one line naming the bad value, no
traceback, and (for everything checkable up front) nothing trained and no record written.

``BAD_INPUTS`` is the table: an id, a function that prepares what the case needs under a temporary
directory and returns the command line, the expected exit code (2 for bad input, 1 for a broken
environment: an unreadable file, a directory that cannot be written) and a fragment of the message.
The cases that cannot be a table row (a disk that fills while a file is written, foreign files among
the records, a closed pipe, a changed image folder, numeric strings that are accepted) follow it.
"""
from __future__ import annotations

import errno
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import image_tree
from harness.cli import main
from harness.data.datasets import load_dataset, load_split_data

REPO = Path(__file__).resolve().parents[1]


def _dirs(tmp: Path) -> list[str]:
    """Data, records and tables of a command under the test's directory, never the repository's."""
    return ["--data-dir", str(tmp / "d"), "--results-dir", str(tmp / "r"), "--leaderboard-dir", str(tmp / "l")]


def _suite(tmp: Path, methods=("random",), protocols=None, **extra) -> str:
    """A one-seed suite on digits (a run of ``random`` trains nothing and evaluates in seconds)."""
    path = tmp / "s.yaml"
    data = {"name": "s", "datasets": ["digits"], "methods": list(methods), "seeds": [0],
            "budget": {"steps": 1}, "protocols": protocols or {"knn": {"k": 5}}, **extra}
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _run(tmp: Path, *args: str, **suite) -> list[str]:
    return ["run", _suite(tmp, **suite), *args, *_dirs(tmp)]


def _on_tree(tmp: Path, spoil: Callable[[Path], None], *args: str) -> list[str]:
    """Run the one-method suite on an image folder after ``spoil(tree)``."""
    tree = image_tree(tmp / "tree")
    spoil(tree)
    return _run(tmp, "--datasets", f"imagefolder:{tree}", *args)


def _corrupt(tree: Path) -> None:
    (tree / "train" / "a" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))


def _truncate(tree: Path) -> None:
    path = tree / "train" / "b" / "5.png"
    path.write_bytes(path.read_bytes()[:60])


def _not_an_image(tree: Path) -> None:
    (tree / "test" / "a" / "notes.txt").write_text("labels checked by hand")


def _mixed_sizes(tree: Path) -> None:
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tree / "test" / "b" / "1.png")


def _empty_class(tree: Path) -> None:
    for f in (tree / "test" / "b").iterdir():
        f.unlink()


def _file(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not a folder")
    return path


def _one_class(tree: Path) -> None:
    for split in ("train", "test"):
        for f in (tree / split / "b").iterdir():
            f.unlink()
        (tree / split / "b").rmdir()


def _truncated_manifest(tmp: Path) -> list[str]:
    load_split_data("digits", tmp / "d", 0.1)
    (manifest,) = (tmp / "d" / "manifests").glob("digits-*.json")
    manifest.write_text(manifest.read_text()[:100])
    return _run(tmp)


def _blocked(tmp: Path, option: str) -> list[str]:
    """``option`` pointing below a regular file: a directory that cannot be created, even by root."""
    (tmp / "file").write_text("")
    return _with(_run(tmp), option, str(tmp / "file" / "out"))


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _saved(obj) -> bytes:
    """``obj`` as torch.save writes it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _with(argv: list[str], option: str, value: str) -> list[str]:
    """``argv`` with ``option`` set to ``value`` (argparse keeps an option's last value, so replace it)."""
    argv[argv.index(option) + 1] = value
    return argv


def _plugin(name: str, body: str) -> bytes:
    """A plugin file that registers the class ``body`` defines as method ``name``."""
    return (f"from methods.base import Method, register_method\n\n@register_method({name!r})\n{body}\n").encode()


def _read_only(tmp: Path) -> list[str]:
    _read_only_dir(tmp)
    return _run(tmp)


def _read_only_dir(tmp: Path) -> Path:
    """``tmp/r``, readable but not writable (the results dir of :func:`_run`)."""
    (tmp / "r").mkdir()
    (tmp / "r").chmod(0o500)
    return tmp / "r"


BAD_INPUTS = [
    # files the harness reads or writes are unusable: exit 1, naming the file
    ("corrupt image", lambda t: _on_tree(t, _corrupt), 1, "cannot read image"),
    ("truncated image", lambda t: _on_tree(t, _truncate), 1, f"b{os.sep}5.png"),
    ("non-image file", lambda t: _on_tree(t, _not_an_image), 1, "notes.txt"),
    ("truncated manifest", _truncated_manifest, 1, "delete it to rebuild"),
    ("results dir cannot be created", lambda t: _blocked(t, "--results-dir"), 1, "--results-dir"),
    ("leaderboard dir cannot be created", lambda t: _blocked(t, "--leaderboard-dir"), 1, "--leaderboard-dir"),
    ("a data dir that is a file", lambda t: _with(_run(t), "--data-dir", str(_write(t / "f", b""))), 1,
     "--data-dir"),
    ("leaderboard into a file", lambda t: ["leaderboard", "quick", "--results-dir", str(_mkdir(t / "r")),
                                           "--leaderboard-dir", str(_write(t / "f", b""))], 1,
     "is a file, not a directory"),
    pytest.param("read-only results dir", _read_only, 1, "Permission denied", id="read-only results dir",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")),
    # bad data: exit 2
    ("images of mixed sizes", lambda t: _on_tree(t, _mixed_sizes), 2, "is 12x10 pixels but"),
    ("empty class folder", lambda t: _on_tree(t, _empty_class), 2, f"test{os.sep}b has no images"),
    ("quick suite on a folder without coarse labels",
     lambda t: ["run", "quick", "--datasets", f"imagefolder:{image_tree(t / 'tree', train=30)}", *_dirs(t)],
     2, "reads coarse labels"),
    # devices
    pytest.param("cuda without a GPU", lambda t: _run(t, "--device", "cuda"), 2, "'cuda' is not available",
                 id="cuda without a GPU", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has a GPU")),
    ("unknown device", lambda t: _run(t, "--device", "tpu"), 2, "unknown device 'tpu'"),
    # method configs: types, ranges, names
    ("lr not a number", lambda t: _run(t, methods=["random", {"name": "simclr", "config": {"lr": "abc"}}]),
     2, "'lr' of method 'simclr' must be a finite number, got 'abc'"),
    ("batch_size 0", lambda t: _run(t, methods=[{"name": "simclr", "config": {"batch_size": 0}}]),
     2, "'batch_size' of method 'simclr' must be at least 1, got 0"),
    ("MoCo's batch not in equal query groups", lambda t: _run(t, methods=["random", {"name": "moco", "config": {
        "batch_size": 100, "bn_splits": 8}}]), 2, "method 'moco': batch_size 100 does not split into bn_splits 8 equal"),
    ("warmup_start 1.5", lambda t: _run(t, methods=[{"name": "simclr", "config": {"warmup_start": 1.5}}]),
     2, "'warmup_start' of method 'simclr' must be"),
    ("lr_update misspelt", lambda t: _run(t, methods=["random", {"name": "simclr", "config": {
        "lr_update": "epoch"}}]), 2, "unknown lr_update 'epoch' (valid: epoch_end, epoch_start, step)"),
    ("input_norm misspelt", lambda t: _run(t, methods=["random", {"name": "simclr", "config": {
        "input_norm": "imagenet"}}]), 2, "unknown input_norm 'imagenet' (valid: dataset, legacy_cifar10, none)"),
    ("CIFAR's constants on 1-channel digits", lambda t: _run(t, methods=["random", {"name": "simclr", "config": {
        "input_norm": "legacy_cifar10"}}]), 2, "method 'simclr': input_norm 'legacy_cifar10' normalises 3-channel "
     "images; dataset 'digits' has 1 (valid for it: dataset, none)"),
    ("a combination normalising unlike its components", lambda t: _run(t, methods=[
        {"name": "supcon_spread", "config": {"input_norm": "none"}}, "thanos"]), 2,
     "method 'thanos': input_norm 'dataset' differs from its component 'supcon_spread''s 'none'"),
    ("erasing probability 2", lambda t: _run(t, methods=[{"name": "simclr", "config": {
        "augment_overrides": {"erasing": 2}}}]), 2, "augment_overrides 'erasing' must be a number in [0, 1], got 2"),
    ("optimizer rmsprop in one method", lambda t: _run(t, methods=["random", {"name": "moco", "config": {
        "optimizer": "rmsprop"}}]), 2, "unknown optimizer 'rmsprop' (valid: adam, adamw, sgd)"),
    ("augment nosuch in one method", lambda t: _run(t, methods=["simclr", {"name": "moco", "config": {
        "augment": "nosuch"}}]), 2, "unknown augment 'nosuch'"),
    ("an adapter's variant key (SeLa label_pass) misspelt", lambda t: _run(t, methods=["random", {"name": "sela",
        "config": {"label_pass": "offical"}}]), 2, "'label_pass' of method 'sela' is 'offical' (valid: official, plain)"),
    ("k-means init misspelt", lambda t: _run(t, protocols={"clustering": {"init": "kmeans++"}}), 2,
     "parameter 'init' of protocol 'clustering' is 'kmeans++' (valid: k-means++, random)"),
    ("a queue of -5 keys", lambda t: _run(t, methods=[{"name": "moco", "config": {"queue_size": -5}}]), 2,
     "'queue_size' of method 'moco' must be at least 1, got -5"),
    ("SeLa with no clusters", lambda t: _run(t, methods=[{"name": "sela", "config": {"num_clusters": 0}}]), 2,
     "'num_clusters' of method 'sela' must be at least 1, got 0"),
    ("a negative temperature", lambda t: _run(t, methods=[{"name": "simclr", "config": {"temperature": -1}}]), 2,
     "'temperature' of method 'simclr' must be positive, got -1"),
    ("a momentum-encoder ema above 1", lambda t: _run(t, methods=[{"name": "moco", "config": {"ema": 1.5}}]), 2,
     "'ema' of method 'moco' must be in [0.0, 1.0], got 1.5"),
    ("a memory-bank momentum above 1", lambda t: _run(t, methods=[{"name": "npid_cld", "config": {"bank_momentum": 2}}]),
     2, "'bank_momentum' of method 'npid_cld' must be in [0.0, 1.0], got 2"),
    ("a smoothing weight above 1", lambda t: _run(t, methods=[{"name": "invcls", "config": {"smooth_alpha": 1.2}}]), 2,
     "'smooth_alpha' of method 'invcls' must be in [0.0, 1.0], got 1.2"),
    ("an augmentation override keyed by a number", lambda t: _run(t, methods=[{"name": "simclr", "config": {
        "augment_overrides": {1: 0.5}}}]), 2, "method 'simclr': unknown augment_overrides key 1 (valid: blur, "),
    ("a crop scale that is one number", lambda t: _run(t, methods=[{"name": "simclr", "config": {
        "augment_overrides": {"crop_scale": 5}}}]), 2, "'crop_scale' must be a list of 2 numbers in [0, 1]"),
    # protocol parameters and their feasibility
    ("knn k not a number", lambda t: _run(t, protocols={"knn": {"k": "twenty"}}),
     2, "'k' of protocol 'knn' must be an integer, got 'twenty'"),
    ("knn temperature 0", lambda t: _run(t, protocols={"knn": {"k": 5, "temperature": 0}}),
     2, "parameter 'temperature' of protocol 'knn' must be positive, got 0"),
    ("k larger than the training set", lambda t: _run(t, protocols={"knn": {"k": 5000}}),
     2, "knn k=5000 is larger than the train_full split of digits"),
    ("clustering k larger than its split", lambda t: _run(t, protocols={"clustering": {"k": [10, 400], "split": "test"}}),
     2, "clustering k=400 is larger than the test split"),
    # protocol parameters that the protocols themselves refused, after training (a CLI sweep found each)
    ("a probe's negative weight decay", lambda t: _run(t, protocols={"sgd": {"weight_decay": -1}}), 2,
     "parameter 'weight_decay' of protocol 'sgd' must be at least 0, got -1"),
    ("a probe's negative momentum", lambda t: _run(t, protocols={"sgd": {"momentum": -0.5}}), 2,
     "parameter 'momentum' of protocol 'sgd' must be in [0, 1], got -0.5"),
    ("an empty l2 grid", lambda t: _run(t, protocols={"lbfgs": {"l2_grid": []}}), 2,
     "parameter 'l2_grid' of protocol 'lbfgs' must be a non-empty list, got []"),
    ("a negative l2 in the grid", lambda t: _run(t, protocols={"coarse_to_fine": {"k": 5, "l2_grid": [0.1, -1.0]}}),
     2, "value 1 of parameter 'l2_grid' of protocol 'coarse_to_fine' must be positive, got -1.0"),
    ("a kNN grid of k 0", lambda t: _run(t, protocols={"knn": {"k": 5, "grid_k": [10, 0]}}), 2,
     "value 1 of parameter 'grid_k' of protocol 'knn' must be a positive integer, got 0"),
    ("a kNN grid of temperature 0", lambda t: _run(t, protocols={"knn": {"k": 5, "grid_temperature": [0]}}), 2,
     "value 0 of parameter 'grid_temperature' of protocol 'knn' must be positive, got 0"),
    ("a negative k-means tolerance", lambda t: _run(t, protocols={"clustering": {"tol": -1}}), 2,
     "parameter 'tol' of protocol 'clustering' must be at least 0, got -1"),
    ("val_knn with no validation split", lambda t: _run(t, protocols={"val_knn": {}}, val_fraction=0), 2,
     "protocol val_knn scores the validation split, which val_fraction 0 leaves empty"),
    ("clustering on an unknown split", lambda t: _run(t, protocols={"clustering": {"split": "validation"}}),
     2, "unknown split 'validation' (valid: all, test, train, train_full, val)"),
    # budgets and command-line lists
    ("infinite budget", lambda t: _run(t, "--budget", "epochs=inf"), 2, "must be a positive number (finite)"),
    ("two budgets in one", lambda t: _run(t, "--budget", "epochs=2 steps=3"), 2,
     "budget must name exactly one unit (epochs, steps, samples, seconds), got 'epochs=2 steps=3'"),
    ("empty budget", lambda t: _run(t, "--budget", ""), 2, "cannot parse budget ''"),
    ("empty method list", lambda t: _run(t, "--methods", ""), 2, "expected a comma-separated list"),
    ("a method the suite does not run", lambda t: _run(t, "--methods", "random,nosuch"), 2,
     "unknown method (in this suite) 'nosuch'"),
    ("reproduce a method the suite does not run", lambda t: ["reproduce", "quick", "--methods", "nosuch",
                                                                 *_dirs(_mkdir(t / "r").parent)[:4]],
     2, "unknown method (in this suite) 'nosuch' (valid: "),
    ("no workers", lambda t: _run(t, "--workers", "0"), 2, "--workers: expected a positive integer"),
    ("a Slurm option with the local executor", lambda t: _run(t, "--slurm-partition", "gpu"), 2,
     "--slurm-partition applies to --executor submitit only"),
    ("a seed twice", lambda t: _run(t, "--seeds", "0,0"), 2, "0 given more than once"),
    ("a dataset twice", lambda t: _run(t, "--datasets", "digits,digits"), 2, "digits given more than once"),
    ("a seed twice in a suite", lambda t: _run(t, seeds=[1, 1]), 2, "'seeds' lists 1 more than once"),
    # suite files: shapes and names (a CLI sweep found these printing tracebacks or writing elsewhere)
    ("a method's config is a list", lambda t: _run(t, methods=[{"name": "simclr", "config": [1]}]), 2,
     "'config' of method 'simclr' must map config keys to values, got [1]"),
    ("a dataset_config entry is not a mapping", lambda t: _run(t, methods=[{"name": "simclr", "dataset_config": {
        "digits": [1]}}]), 2, "'dataset_config' of method 'simclr' must map dataset names to config mappings"),
    ("a dataset_config for a dataset the suite does not run", lambda t: _run(t, methods=[
        {"name": "simclr", "dataset_config": {"mnist": {"lr": 0.1}}}]), 2, "has a dataset_config for ['mnist']"),
    ("a list where a method name goes", lambda t: _run(t, methods=[{"name": ["simclr"]}]), 2,
     "a mapping with a 'name' string, got {'name': ['simclr']}"),
    ("a list where the backbone goes", lambda t: _run(t, backbone=["x"]), 2, "unknown backbone ['x']"),
    ("keys of mixed types", lambda t: _run(t, **{"1": "a"}), 2, "unknown key ['1']"),
    ("a suite name with a path in it", lambda t: _run(t, name="../escape"), 2,
     "the suite name '../escape' must be letters, digits"),
    ("an empty suite name", lambda t: _run(t, name=""), 2, "the suite name '' must be letters"),
    ("a row label that is not a string", lambda t: _run(t, methods=[{"name": "simclr", "as": [1, 2]}]), 2,
     "'as' of method 'simclr' must be a non-empty string"),
    ("a row label over two lines", lambda t: _run(t, methods=[{"name": "simclr", "as": "sim\nclr"}]), 2,
     "'as' of method 'simclr' must be a non-empty string on one line without '|'"),
    ("a row label --methods cannot pick", lambda t: _run(t, methods=[{"name": "simclr", "as": "r,s"}]), 2,
     "'as' of method 'simclr' must be a non-empty string on one line without '|' (the row's label in every table) "
     "or ',' (--methods LABEL,LABEL picks rows), got 'r,s'"),
    ("a row label that splits a table's cells", lambda t: _run(t, methods=[{"name": "simclr", "as": "a|b"}]), 2,
     "got 'a|b'"),
    ("a description that is a list", lambda t: _run(t, description=["cifar", "cpu"]), 2,
     "description must be text, got ['cifar', 'cpu']"),  # it was printed as the list's repr in every table
    ("deterministic not a boolean", lambda t: _run(t, deterministic="no"), 2,
     "deterministic must be true or false, got 'no'"),
    ("a seed too large for the RNGs", lambda t: _run(t, "--seeds", "99999999999999999999"), 2,
     "seeds must be integers in [0, 2147483648)"),
    ("a fractional step budget", lambda t: _run(t, "--budget", "steps=1.5"), 2, "budget steps must be a whole number"),
    ("a fractional sample budget", lambda t: _run(t, "--budget", "samples=1000.5"), 2,
     "budget samples must be a whole number"),
    ("an option given twice", lambda t: _run(t, "--seeds", "0,1", "--seeds", "2"), 2,
     "argument --seeds: given more than once"),
    ("a table that claims no protocol's metrics", lambda t: _run(t, tables={"extra": ["nosuchmetric"]}), 2,
     "claims metrics 'nosuchmetric', which no protocol of the suite writes"),
    ("a table that empties the main table", lambda t: _run(t, tables={"mine": ["knn/"]}), 2,
     "leaves the main table empty"),
    ("a slurm section that is not a mapping", lambda t: _run(t, slurm="bogus"), 2, "slurm must be a mapping"),
    ("a slurm time limit that is not a number", lambda t: _run(t, slurm={"timeout_min": "abc"}), 2,
     "timeout_min must be a whole number of at least 1, got 'abc'"),
    ("a submitit cluster that does not exist", lambda t: _run(t, slurm={"cluster": "bogus"}), 2,
     "slurm: unknown submitit cluster 'bogus' (valid: local, slurm)"),  # was found by --executor submitit alone
    ("an infinite Slurm memory", lambda t: _run(t, slurm={"mem_gb": float("inf")}), 2,
     "mem_gb must be a positive number, got inf"),
    pytest.param("a dry run logging to W&B without wandb", lambda t: _run(t, "--dry-run", "--log", "wandb"), 2,
                 "--log wandb needs a package that is not installed", id="a dry run logging to W&B without wandb",
                 marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb installed")),
    ("a suite file that is not UTF-8", lambda t: ["run", str(_write(t / "u.yaml", "name: s".encode("utf-16"))),
                                                 *_dirs(t)], 2, "is not UTF-8 text"),
    ("a key twice in a suite file", lambda t: ["run", str(_write(t / "d.yaml", b"name: s\nseeds: [0]\nseeds: [1]\n")),
                                               *_dirs(t)], 2, "at line 3: key 'seeds' appears twice"),
    *[(f"a suite file with {what}", lambda t, body=body: ["run", str(_write(t / "a.yaml", (
        "name: s\ndatasets: [digits]\nseeds: [0]\nbudget: {steps: 1}\n" + body).encode())), *_dirs(t)], 2, fragment)
      for what, body, fragment in [  # each was a RecursionError traceback
          ("an anchor that contains itself", "methods: [random]\nprotocols: {clustering: {k: &k [*k]}}\n",
           "has an alias inside its own anchor (such as `k: &a [*a]`)"),
          ("a config list that contains itself", "methods: [{name: simclr, config: {milestones: &m [0.5, *m]}}]\n"
                                                 "protocols: {knn: {k: 5}}\n", "has an alias inside its own anchor"),
          ("lists nested 3000 deep", "methods: [random]\nprotocols: {knn: {k: 5}}\ndescription: " + "[" * 3000
           + "]" * 3000 + "\n", "nests lists or mappings hundreds of levels deep")]],
    ("a suite path that is a directory", lambda t: ["run", str(_mkdir(t / "dir.yaml")), *_dirs(t)], 2,
     "is a directory"),
    ("an empty plugin name", lambda t: ["--plugin", "", "list"], 2, "cannot import plugin '': ValueError"),
    ("a plugin that is not there", lambda t: ["--plugin", "no_such_plugin_module", "list"], 2,
     "No module named 'no_such_plugin_module'"),
    ("a plugin file that is not there", lambda t: ["list", "--plugin", str(t / "mine.py")], 2,
     "mine.py': FileNotFoundError: no such file"),
    ("a plugin that calls sys.exit", lambda t: ["--plugin", str(_write(t / "quits.py", b"import sys\nsys.exit(3)\n")),
                                                "list"], 2, "cannot import plugin"),  # it exited 3, saying nothing
    ("a plugin method that is not a Method", lambda t: ["--plugin", str(_write(t / "plain.py", _plugin(
        "_plain", "class _Plain:\n    pass"))), "list"], 2, "'_Plain' is not a subclass of methods.base.Method"),
    ("a plugin method without training_step", lambda t: ["--plugin", str(_write(t / "stepless.py", _plugin(
        "_stepless", "class _Stepless(Method):\n    pass"))), "list"], 2,
     "method '_stepless': _Stepless trains but does not implement training_step"),  # it failed at its first step
    ("a suite file naming a method no plugin registered", lambda t: _run(t, methods=["my_byol"]), 2,
     "; a method of your own registers when its module is imported: python -m harness --plugin MODULE"),
    # the hint ends the line: the leaderboard once appended "and no stored records under <results>/<the file>"
    ("leaderboard of a suite file naming a method no plugin registered",
     lambda t: ["leaderboard", _suite(t, methods=["my_byol"]), *_dirs(_mkdir(t / "r").parent)[2:]], 2,
     "; a method of your own registers when its module is imported: python -m harness --plugin MODULE COMMAND ...\n"),
    # eval of an external checkpoint
    ("eval of an empty checkpoint file", lambda t: ["eval", "--checkpoint", str(_write(t / "e.pt", b"")), "--arch",
                                                   "small_cnn", "--data-dir", str(t / "d")], 2,
     "cannot load"),
    ("eval of a pickled module", lambda t: ["eval", "--checkpoint", str(_write(t / "m.pt", _saved(torch.nn.Linear(2, 2)))),
                                            "--arch", "small_cnn"], 2,
     "it pickles torch.nn.modules.linear.Linear, which could run code when loaded; save the encoder's state_dict()"),
    ("eval of a plain pickle", lambda t: ["eval", "--checkpoint", str(_write(t / "p.pkl", pickle.dumps({"w": [1.0]}))),
                                          "--arch", "small_cnn"], 2, "it is not a file torch.save wrote"),
    ("eval with an unknown input normalisation", lambda t: ["eval", "--checkpoint", "x.pt", "--arch", "small_cnn",
                                                             "--input-norm", "imagenet"], 2,
     "unknown input_norm 'imagenet' (valid: dataset, legacy_cifar10, none)"),
    ("eval of digits with CIFAR's constants", lambda t: ["eval", "--checkpoint", "x.pt", "--arch", "small_cnn",
                                                         "--input-norm", "legacy_cifar10"], 2,
     "input_norm 'legacy_cifar10' normalises 3-channel images; dataset 'digits' has 1"),
    ("eval of a directory as checkpoint", lambda t: ["eval", "--checkpoint", str(t), "--arch", "small_cnn"], 2,
     "is a directory"),
    ("eval at a huge image size", lambda t: ["eval", "--checkpoint", "x.pt", "--arch", "small_cnn", "--image-size",
                                             "100000"], 2, "expected at most 4096 pixels"),
    ("eval with k larger than the data", lambda t: ["eval", "--checkpoint", "x.pt", "--arch", "small_cnn", "--dataset",
                                                    f"imagefolder:{image_tree(t / 'tree')}", "--data-dir", str(t / "d")],
     2, "knn k=200 is larger than"),
    # a second CLI sweep: each of these printed a traceback, trained first, or quietly did something else
    ("an empty suite argument", lambda t: ["run", "", *_dirs(t)], 2, "expected a suite name or a path to a YAML file, got ''"),
    ("a suite argument too long for a file name", lambda t: ["run", "x" * 300, *_dirs(t)], 2, "unknown suite 'xxx"),
    ("leaderboard of a suite argument too long for a file name", lambda t: ["leaderboard", "x" * 300, *_dirs(_mkdir(t / "r").parent)[2:]],
     2, "unknown suite 'xxx"),
    ("a suite name too long for its tables' file names", lambda t: _run(t, name="x" * 101), 2,
     "at most 100 of them"),
    ("leaderboard of an empty suite argument", lambda t: ["leaderboard", "", *_dirs(_mkdir(t / "r").parent)[2:]], 2,
     "expected a suite name or a path to a YAML file, got ''"),
    ("migrate of a suite name with a path in it", lambda t: ["migrate", "..", "--results-dir", str(_mkdir(t / "r"))], 2,
     "the suite name '..' must be letters, digits"),
    ("an empty list of clustering k", lambda t: _run(t, protocols={"clustering": {"k": []}}), 2,
     "parameter 'k' of protocol 'clustering' must be a positive integer or a non-empty list of them, got []"),
    ("a dataset of one class", lambda t: _on_tree(t, _one_class), 2, "has 1 class ('a'); the protocols need at least 2"),
    ("an image folder without a path", lambda t: _run(t, "--datasets", "imagefolder:"), 2,
     "dataset 'imagefolder:' names no folder; valid: imagefolder:PATH"),  # was "dataset '' not found: looked for ."
    ("an image folder that is a file", lambda t: _run(t, "--datasets", f"imagefolder:{_file(t / 'f.jpg')}"), 2,
     "f.jpg' is a file; give the folder that holds one folder of images per class"),
    ("bench sinkhorn larger than memory", lambda t: ["bench", "sinkhorn", "--sizes", "99999999999999", "--clusters", "3"],
     2, "N=99999999999999 x K=3 logits need"),
    ("migrate a suite of an empty results dir", lambda t: ["migrate", "nosuch", "--results-dir", str(_mkdir(t / "r"))],
     2, "no suite 'nosuch' in "),
    ("migrate a results dir that is not there", lambda t: ["migrate", "--results-dir", str(t / "none")], 2,
     "does not exist"),
    *[(f"{args[0]} of a results dir that is not there", lambda t, args=args: [*args, "--results-dir", str(t / "r")], 2,
       "r' does not exist; give the folder that holds <suite>/<run_id>.json records")
      for args in (["leaderboard", "quick"], ["report", "quick"], ["compare", "quick", "simclr", "pixels"],
                   ["reproduce", "quick"])],
    ("leaderboard of a results dir that is a file", lambda t: ["leaderboard", "--results-dir", str(_file(t / "f"))], 2,
     "f' is a file"),
    ("an empty results dir path", lambda t: _run(t, "--results-dir", ""), 2, "expected a path, got ''"),
    ("a suite file named otherwise inside", lambda t: ["run", str(_write(t / "file.yaml", b"name: inside\ndatasets: [digits]\n"
                                                                   b"methods: [random]\nseeds: [0]\nbudget: steps=1\n")),
                                                       *_dirs(t)], 2,
     "suite 'inside' (file.yaml): missing required key 'protocols'"),
    # benchmarks: arguments checked before anything is timed
    ("bench train of a method that does not train", lambda t: ["bench", "train", "--methods", "random"], 2,
     "unknown training method 'random'"),
    ("bench gpu with an empty method list", lambda t: ["bench", "gpu", "--smoke", "--methods", ""], 2,
     "--methods: expected a comma-separated list"),
    ("bench gpu with an unknown option", lambda t: ["bench", "gpu", "--nosuch"], 2, "unrecognized arguments: --nosuch"),
    ("bench output that is a directory", lambda t: ["bench", "gpu", "--smoke", "--out", str(t)], 2, "is a directory"),
    ("bench output below a file", lambda t: ["bench", "sinkhorn", "--out", str(_write(t / "f", b"") / "x.md")], 2,
     "f' is a file, not a directory"),
    pytest.param("bench output in a read-only folder", lambda t: ["bench", "sinkhorn", "--out",
                                                                          str(_read_only_dir(t) / "x.md")],
                 1, "is not a writable directory; fix its permissions or pass another --out",
                 id="bench output in a read-only folder",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")),
    ("bench sinkhorn of size 0", lambda t: ["bench", "sinkhorn", "--sizes", "0"], 2, "expected a positive integer"),
    ("bench sinkhorn with lambda nan", lambda t: ["bench", "sinkhorn", "--lam", "nan"], 2, "expected a positive number"),
    ("bench sinkhorn of an unknown precision", lambda t: ["bench", "sinkhorn", "--dtypes", "float16"], 2,
     "unknown chunk precision 'float16'"),
    # tuning
    pytest.param("tuning on a device this machine lacks", lambda t: ["tune", "simclr", "digits", "--trials", "1",
                                                                       "--budget", "steps=1", "--device", "tpu",
                                                                       "--results-dir", str(t / "r")],
                 2, "unknown device 'tpu'", id="tuning on a device this machine lacks",
                 marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed")),
    ("an empty study name", lambda t: ["tune", "simclr", "digits", "--study", ""], 2,
     "argument --study: expected a study name, got ''"),
    ("an empty Optuna storage", lambda t: ["tune", "simclr", "digits", "--storage", " "], 2,
     "argument --storage: expected an Optuna storage URL, got ' '"),
    pytest.param("a study name with a path in it", lambda t: ["tune", "simclr", "digits", "--trials", "1", "--budget",
                                                              "steps=1", "--study", "a/b", "--results-dir", str(t / "r")],
                 2, "study name 'a/b' must be letters", id="a study name with a path in it",
                 marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed")),
    pytest.param("tuning on data that is not there", lambda t: ["tune", "simclr", f"imagefolder:{t / 'none'}", "--trials",
                                                                "1", "--budget", "steps=1", *_dirs(t)[:4]],
                 2, "none' does not exist", id="tuning on data that is not there",
                 marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed")),
    pytest.param("unknown tuning storage", lambda t: ["tune", "simclr", "digits", "--trials", "1", "--budget",
                                                      "steps=1", "--storage", "bogus://x", "--results-dir", str(t / "r")],
                 2, "cannot use Optuna storage 'bogus://x'", id="unknown tuning storage",
                 marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed")),
    *[pytest.param(f"a tuning storage of {what}", lambda t, url=url: [
        "tune", "simclr", "digits", "--trials", "1", "--budget", "steps=1", "--storage", url(t),
        "--results-dir", str(t / "r")], 2, fragment, id=f"a tuning storage of {what}",
        marks=pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="optuna not installed"))
      for what, url, fragment in [  # the in-memory one trained, lost its study and printed a heartbeat traceback
          ("an in-memory database", lambda t: "sqlite://", "is an in-memory database: the study would be lost"),
          ("an in-memory database file", lambda t: "sqlite:///:memory:", "is an in-memory database"),
          ("a journal without a file", lambda t: "journal:", "'journal:' names no file; valid: journal:///PATH"),
          ("a journal that is a folder", lambda t: f"journal://{t}", "names the folder")]],
]


@pytest.mark.parametrize("name,command,code,fragment",
                         [pytest.param(*row, id=row[0]) if type(row) is tuple else row for row in BAD_INPUTS])
def test_bad_input_stops_before_training_with_one_line(name, command, code, fragment, tmp_path, capsys,
                                                       monkeypatch):
    """Each bad input exits with its code and one line holding ``fragment``, before any run starts.

    Catches: a check removed or moved after training (Runner.run is called, or a record is
    written), a traceback instead of a line, the wrong exit code, a message that no longer names
    the bad value."""
    from harness.execution.runner import Runner

    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's results/ or leaderboards/
    argv = command(tmp_path)
    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail(f"{name}: a run started"))
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not list(tmp_path.glob("r/**/*.json")), "a record was written"
    assert not (tmp_path / "r" / "tune").exists(), "an empty study database was left"


LAUNCH_VARIABLES = {  # a malformed launcher environment: the variables, and the one named in the error line
    "a rank that is not a number": ({"RANK": "abc", "WORLD_SIZE": "2"}, "RANK='abc'"),
    "a world size that is not a number": ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
    "a rank outside the world": ({"RANK": "5", "WORLD_SIZE": "2"}, "RANK='5' must be an integer from 0 to 1"),
    "a local rank that is not a number": ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "x"}, "LOCAL_RANK='x'"),
    "a port out of range": ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "99999999"},
                            "MASTER_PORT='99999999' must be an integer from 1 to 65535"),
    "a Slurm task count that is not a number": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "x"}, "SLURM_NTASKS='x'"),
    "a Slurm job id that is not a number": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "x"},
                                            "SLURM_JOB_ID='x'"),
    "a Slurm node list that does not parse": ({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "["},
                                              "cannot parse Slurm node list '['"),
}


@pytest.mark.parametrize("case", LAUNCH_VARIABLES)
def test_a_malformed_launcher_environment_is_one_line_naming_the_variable(case):
    """torchrun's and Slurm's variables are read with a check: not an integer, a rank the world size does not have, a
    port out of range or a node list that does not parse is a UsageError naming the variable. Catches the ValueError
    tracebacks from int() of a CLI sweep, and RANK=5 with WORLD_SIZE=2, which waited for a rendezvous for two hours."""
    from harness.engine.distributed import env_from
    from harness.errors import UsageError

    variables, fragment = LAUNCH_VARIABLES[case]
    with pytest.raises(UsageError, match="environment variable |Slurm node list") as error:
        env_from(variables)
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_a_malformed_launcher_variable_stops_run_with_exit_2(tmp_path, capsys, monkeypatch):
    """The same check through ``run``: exit 2 and one line, nothing trained or stored."""
    from harness.execution.runner import Runner

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RANK", "abc")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main(_run(tmp_path)) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: environment variable RANK='abc' must be an integer") and err.count("\n") == 1, err
    assert not list(tmp_path.glob("r/**/*.json"))


@pytest.mark.parametrize("command", ["leaderboard", "reproduce"])
def test_reading_a_results_dir_that_is_not_there_creates_no_folder(command, tmp_path, monkeypatch, capsys):
    """``leaderboard`` probed its tables' folder before it found no records, leaving an empty
    ``<dir>-leaderboards`` beside the mistyped results dir; ``reproduce``, which only reads the records (its reruns
    train in a scratch directory), created the mistyped results dir itself, and refused a read-only one."""
    monkeypatch.chdir(tmp_path)
    assert main([command, "--results-dir", str(tmp_path / "typo")]) == 2
    assert "typo' does not exist" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def stored_run(tmp_path, monkeypatch):
    """A results dir holding the record of one ``random`` run on digits (nothing trains)."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", _suite(tmp_path), "--quiet", *_dirs(tmp_path)]) == 0
    return tmp_path


def test_foreign_and_corrupt_json_in_the_results_dir_are_skipped_with_a_warning(stored_run, capsys):
    """``leaderboard`` skips a truncated record and a JSON file that is not a record, one warning line
    naming each, and still builds the table. Catches: a traceback (JSONDecodeError, KeyError
    'spec'), a file skipped silently, a warning that does not name the file, an edited-in inf metric that
    the table averaged into an inf mean (numpy warned)."""
    store = stored_run / "r" / "s"
    (record,) = store.glob("*.json")
    (store / "cut.json").write_text(record.read_text()[:200])
    (store / "notes.json").write_text(json.dumps({"author": "me", "todo": ["more seeds"]}))
    good = json.loads(record.read_text())  # hand-edited copies (a CLI sweep found each failing the table)
    (store / "edited-metrics.json").write_text(json.dumps({**good, "run_id": "x1", "metrics": "abc"}))
    (store / "edited-value.json").write_text(json.dumps({**good, "run_id": "x2", "metrics": {"backbone": {
        "knn/top1": "nan"}}}))
    (store / "edited-spec.json").write_text(json.dumps({**good, "run_id": "x3", "spec": {**good["spec"], "label": None}}))
    (store / "edited-inf.json").write_text(json.dumps({**good, "run_id": "x4", "metrics": {"backbone": {
        "knn/top1": float("inf")}}}))
    capsys.readouterr()
    assert main(["leaderboard", str(stored_run / "s.yaml"), "--results-dir", str(stored_run / "r"),
                 "--leaderboard-dir", str(stored_run / "l")]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 6 and "cut.json" in warnings[0] and "notes.json" in warnings[-1]
    assert "edited-inf.json" in warnings[1] and "metric backbone/knn/top1 is inf, not a finite" in warnings[1]
    assert "edited-metrics.json" in warnings[2] and "'metrics' is not a mapping" in warnings[2]
    assert "edited-spec.json" in warnings[3] and "spec 'label' is None" in warnings[3]
    assert "edited-value.json" in warnings[4]
    assert "random" in out.out and "Traceback" not in out.err


def test_planned_records_missing_what_the_tables_read_are_skipped_with_a_warning(stored_run, capsys):
    """Hand-edited copies that keep a planned run id but lose a spec field the tables read (the seed) or hold a
    protocols entry that is not a mapping: each is one warning naming the file, and the table is built from
    the rest. Catches: a KeyError 'seed' or AttributeError traceback (a CLI sweep found both)."""
    store = stored_run / "r" / "s"
    (record,) = store.glob("*.json")
    good = json.loads(record.read_text())
    spec = {k: v for k, v in good["spec"].items() if k != "seed"}
    (store / "no-seed.json").write_text(json.dumps({**good, "spec": spec}))
    (store / "odd-protocols.json").write_text(json.dumps({**good, "spec": {**good["spec"], "protocols": "knn"}}))
    capsys.readouterr()
    assert main(["leaderboard", str(stored_run / "s.yaml"), "--results-dir", str(stored_run / "r"),
                 "--leaderboard-dir", str(stored_run / "l")]) == 0
    out = capsys.readouterr()
    warnings = [line for line in out.err.splitlines() if line.startswith("warning")]
    assert len(warnings) == 2 and "no-seed.json" in warnings[0] and "no spec 'seed'" in warnings[0]
    assert "odd-protocols.json" in warnings[1] and "spec 'protocols' is 'knn'" in warnings[1]
    assert "random" in out.out and "Traceback" not in out.err


def test_a_record_of_no_method_beside_the_planned_ones_is_left_out_with_a_warning(stored_run, capsys):
    """A record the tables can read but that names no method (written by another tool, or hand-made) and that the
    suite does not plan: ``leaderboard`` leaves it out with its one warning line and builds the table. Catches the
    KeyError 'method' traceback of a CLI sweep (the warning asked each left-out record for its method)."""
    store = stored_run / "r" / "s"
    (record,) = store.glob("*.json")
    good = json.loads(record.read_text())
    spec = {k: v for k, v in good["spec"].items() if k != "method"}
    (store / "other-tool.json").write_text(json.dumps({**good, "run_id": "0000000000000000", "spec": spec}))
    capsys.readouterr()
    assert main(["leaderboard", str(stored_run / "s.yaml"), "--results-dir", str(stored_run / "r"),
                 "--leaderboard-dir", str(stored_run / "l")]) == 0
    out = capsys.readouterr()
    assert out.err.startswith("left out 1 stored records of ") and out.err.count("\n") == 1, out.err
    assert "random" in out.out


def test_compare_of_rows_with_no_seed_in_common_is_an_error(tmp_path, capsys, monkeypatch):
    """``compare`` of two rows stored on different seeds: exit 2 and one line listing each row's seeds.
    Catches: a table of n=0 columns printed with exit 0, as if it were a result."""
    monkeypatch.chdir(tmp_path)
    suite = _suite(tmp_path, methods=("random", "pixels"), seeds=[0, 1])
    assert main(["run", suite, "--quiet", *_dirs(tmp_path)]) == 0
    for path in (tmp_path / "r" / "s").glob("*.json"):
        spec = json.loads(path.read_text())["spec"]
        if (spec["label"], spec["seed"]) in (("random", 1), ("pixels", 0)):
            path.unlink()
    capsys.readouterr()
    assert main(["compare", suite, "random", "pixels", "--results-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == "error: 'random' and 'pixels' share no seed (seeds random: 0; pixels: 1); run both on the same " \
                  "seeds to pair them\n"


def test_a_truncated_record_of_a_planned_run_stops_the_suite_before_training(stored_run, capsys, monkeypatch):
    """A record cut short by hand (or a broken copy) of a run the suite plans: exit 1 with one line naming the
    file and saying to delete it, before any other run trains. Catches: a JSONDecodeError traceback, and a
    check made only when the run's turn comes (after earlier runs have trained)."""
    import harness.execution.runner

    path = stored_run / "s.yaml"
    path.write_text(path.read_text().replace("- random", "- simclr\n- random"))  # simclr plans first
    (record,) = (stored_run / "r" / "s").glob("*.json")
    record.write_text(record.read_text()[:100])
    monkeypatch.setattr(harness.execution.runner.Runner, "run_job", lambda *a: pytest.fail("a run trained"))
    capsys.readouterr()
    assert main(["run", str(path), "--quiet", *_dirs(stored_run)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and record.name in err and "delete it" in err


@pytest.mark.parametrize("content", ["[]", '"notes"', "{}"], ids=["a list", "a string", "an empty mapping"])
def test_a_planned_records_file_that_is_not_a_record_stops_the_suite_before_training(content, stored_run, capsys,
                                                                                     monkeypatch):
    """A planned run's record file holding JSON that is not a run record (a list, a string, ``{}``): exit 1 with one
    line naming the file and saying to delete it, before anything trains. Catches the AttributeError traceback
    ('list' object has no attribute 'get') of a CLI sweep, and ``{}`` counted as a stored failed run that no rerun
    without --retry-failed would ever train."""
    import harness.execution.runner

    (record,) = (stored_run / "r" / "s").glob("*.json")
    record.write_text(content)
    monkeypatch.setattr(harness.execution.runner.Runner, "run_job", lambda *a: pytest.fail("a run trained"))
    capsys.readouterr()
    for extra in (["--dry-run"], []):
        assert main(["run", str(stored_run / "s.yaml"), "--quiet", *extra, *_dirs(stored_run)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: record ") and record.name in err, err
        assert "is JSON but not a run record" in err and "delete it" in err


def test_a_forced_rerun_checks_its_data_before_training(tmp_path, capsys, monkeypatch):
    """A stored run of kNN k=5 on an image folder of 24 training images, which then shrinks to 4: ``--force``
    retrains it, so its data is checked first, and the run stops with one line before anything trains. Catches
    the data check made only for runs with no record, which a rerun of stored runs skips."""
    from harness.execution.runner import Runner

    monkeypatch.chdir(tmp_path)
    tree = image_tree(tmp_path / "tree")
    argv = _run(tmp_path, "--datasets", f"imagefolder:{tree}", "--quiet")
    assert main(argv) == 0
    for image in [*(tree / "train").glob("*/[!01].png"), *(tree / "train").glob("*/1?.png")]:
        image.unlink()
    assert sorted(p.name for p in (tree / "train" / "a").iterdir()) == ["0.png", "1.png"]
    capsys.readouterr()
    monkeypatch.setattr(Runner, "run", lambda *a, **k: pytest.fail("a run started"))
    assert main([*argv, "--force"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert f"knn k=5 is larger than the train_full split of imagefolder:{tree} (4 samples)" in err


@pytest.mark.parametrize("filled_at", ["manifest", "record"])
def test_a_full_disk_is_one_line_exit_1_and_leaves_no_temp_file(filled_at, tmp_path, capsys, monkeypatch):
    """ENOSPC while the split manifest (before training) or a run's record (after it) is written:
    exit 1, one line, and neither the file nor a temporary file on disk. Catches: a traceback, a
    half-written file, a temporary file left behind (the issue saw a 62 KB one)."""
    import harness.execution.store

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.chdir(tmp_path)
    if filled_at == "record":  # the manifest is there, so the first file written is the record
        load_split_data("digits", tmp_path / "d", 0.1)
    monkeypatch.setattr(harness.execution.store.os, "fsync", disk_full)
    assert main(["run", _suite(tmp_path), "--quiet", *_dirs(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert ("manifests" if filled_at == "manifest" else "/r/s/") in err  # the line names the file
    manifests = [f"d/manifests/{p.name}" for p in (tmp_path / "d" / "manifests").glob("*.json")]
    assert len(manifests) == (filled_at == "record")  # the one written before the disk filled, if any
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == \
        manifests + ["s.yaml"]


def test_a_quick_protocol_benchmark_leaves_the_committed_table_alone(tmp_path, capsys, monkeypatch):
    """``bench protocols --quick`` (a smoke test, as ``bench gpu --smoke``) writes its table to a temporary file
    unless ``--out`` says where. Catches the smoke run replacing leaderboards/bench-protocols.md with toy sizes."""
    pytest.importorskip("faiss")
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "protocols", "--quick"]) == 0
    written = Path(capsys.readouterr().out.splitlines()[-1].removeprefix("written: "))
    assert list(tmp_path.iterdir()) == [] and written.read_text().startswith("# Protocol benchmarks (quick sizes)")


def test_a_benchmark_table_is_written_atomically(tmp_path, capsys, monkeypatch):
    """A disk that fills while a benchmark writes its table: exit 1 with one line, and the table of the run before
    is kept whole, with no temporary file beside it. Catches the plain write_text that truncated the old table first."""
    import harness.execution.store

    pytest.importorskip("faiss")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    out = _write(tmp_path / "bench.md", b"# the table of the run before\n")
    monkeypatch.setattr(harness.execution.store.os, "fsync", disk_full)
    assert main(["bench", "protocols", "--quick", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write ") and "No space left on device" in err and err.count("\n") == 1
    assert out.read_bytes() == b"# the table of the run before\n" and [p.name for p in tmp_path.iterdir()] == ["bench.md"]


def test_listing_into_a_closed_pipe_exits_quietly(tmp_path):
    """``harness list | head``: a reader that has gone makes no BrokenPipeError traceback. The read
    end is closed before the process starts, so every write fails (deterministic, unlike ``head``).
    Catches: the traceback, and the second one Python prints when flushing stdout at exit."""
    read, write = os.pipe()
    os.close(read)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "harness", "list"], stdout=write, stderr=subprocess.PIPE,
                         cwd=tmp_path, env=env, text=True, timeout=300)
    os.close(write)
    assert out.returncode == 141 and out.stderr == ""


def test_a_changed_image_folder_is_decoded_again_and_cached_in_the_data_dir(tmp_path):
    """The decoded cache is keyed by the tree's file names, sizes and times and lives in
    ``<data-dir>/cache``: an image replaced after first use is seen, and nothing is written beside
    the user's folder. Catches: the stale cache of the issue (reused after the change), a cache
    written into the data's parent folder."""
    tree = image_tree(tmp_path / "user" / "tree")
    first = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    changed = np.full((8, 8, 3), 7, np.uint8)
    Image.fromarray(changed).save(tree / "train" / "a" / "0.png")
    again = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    assert first.images[0].permute(1, 2, 0).numpy().tolist() != changed.tolist()
    assert np.array_equal(again.images[0].permute(1, 2, 0).numpy(), changed)
    assert np.array_equal(again.images[1:], first.images[1:])
    assert sorted(p.name for p in (tmp_path / "user").iterdir()) == ["tree"]
    assert len(list((tmp_path / "d" / "cache").glob("tree-native-*.pt"))) == 2


def test_an_image_edited_in_place_to_the_same_byte_size_is_decoded_again(tmp_path):
    """Uncompressed BMPs of one size have one byte size: an image overwritten with other pixels keeps its name and
    size, and only its modification time tells the cache it changed. Catches a cache key without the times."""
    tree = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (tree / split / cls).mkdir(parents=True)
            Image.fromarray(np.full((4, 4, 3), 50, np.uint8)).save(tree / split / cls / "0.bmp")
    path = tree / "train" / "a" / "0.bmp"
    first = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    size, mtime_ns = path.stat().st_size, path.stat().st_mtime_ns
    Image.fromarray(np.full((4, 4, 3), 200, np.uint8)).save(path)
    os.utime(path, ns=(mtime_ns + 10**9, mtime_ns + 10**9))  # a later time, whatever the file system's resolution
    again = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    assert path.stat().st_size == size
    assert int(first.images[0].max()) == 50 and int(again.images[0].min()) == 200


def test_an_image_moved_to_another_class_folder_is_read_with_its_new_label(tmp_path):
    """Relabelling by moving a file keeps its name, size and time; only its path says it moved. Here the moved file
    (train/a/a1.png to train/b/) is listed in the same place of the walk, so a cache keyed by file names alone would
    answer with the old label. Catches a tree fingerprint without the paths relative to the tree."""
    tree, rng = tmp_path / "tree", np.random.default_rng(0)
    for split, names in (("train", {"a": ["a0", "a1"], "b": ["b0", "b1"]}), ("test", {"a": ["a0"], "b": ["b0"]})):
        for cls, files in names.items():
            (tree / split / cls).mkdir(parents=True)
            for name in files:
                Image.fromarray(rng.integers(0, 255, (4, 4, 3), dtype=np.uint8)).save(tree / split / cls / f"{name}.png")
    first = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    os.replace(tree / "train" / "a" / "a1.png", tree / "train" / "b" / "a1.png")
    again = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    assert first.labels[first.is_train].tolist() == [0, 0, 1, 1]
    assert again.labels[again.is_train].tolist() == [0, 1, 1, 1] and torch.equal(again.images, first.images)


def test_the_decoded_cache_is_per_class_list(tmp_path):
    """One tree read with its classes in name order and with an explicit list in another order (a dataset such as
    ImageNet-10 fixes its list) gets two cache files with their own labels, so a list changed in the code is never
    answered from the cache of the old one. Catches a cache key without the class list."""
    from harness.data.datasets import _cached_folder

    image_tree(tmp_path / "tree", train=2, test=1)
    named = _cached_folder("tree", tmp_path, "tree", None, tmp_path / "cache")
    listed = _cached_folder("tree", tmp_path, "tree", None, tmp_path / "cache", classes=("b", "a"))
    assert named.classes == ("a", "b") and listed.classes == ("b", "a")
    assert torch.equal(listed.images[:2], named.images[2:4]) and listed.labels.tolist() == named.labels.tolist()
    assert len(list((tmp_path / "cache").glob("tree-native-*.pt"))) == 2


@pytest.mark.parametrize("spoiled", [b"", b"not a tensor file", _saved({"images": torch.zeros(1)})],
                         ids=["empty", "not a tensor file", "other fields"])
def test_an_unreadable_decoded_cache_is_decoded_again(tmp_path, spoiled):
    """A cache file left empty, overwritten, or holding other fields (EOFError, UnpicklingError, TypeError as it
    loads) is rebuilt from the tree: the same images and labels, and a readable cache file again. Catches a
    cache whose load errors other than a truncated zip stop every run of the dataset."""
    tree = image_tree(tmp_path / "tree", train=2, test=1)
    first = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    (cache,) = (tmp_path / "d" / "cache").glob("tree-native-*.pt")
    cache.write_bytes(spoiled)
    again = load_dataset(f"imagefolder:{tree}", tmp_path / "d")
    assert torch.equal(again.images, first.images) and again.labels.tolist() == first.labels.tolist()
    assert torch.load(cache, weights_only=True)["labels"].tolist() == first.labels.tolist()


def test_yaml_numbers_pyyaml_reads_as_strings_are_used_as_numbers(tmp_path):
    """PyYAML reads ``1e-3`` (no dot) as the string '1e-3'; configs, protocol parameters and budgets
    take it as the number, converted to the declared type. Catches: the string reaching the
    optimiser (a TypeError after other runs trained), or being rejected as bad input."""
    from harness.execution.runner import plan
    from harness.execution.suite import load_suite

    path = tmp_path / "s.yaml"
    path.write_text("name: s\ndatasets: [digits]\nseeds: [0]\nbudget: {steps: 2e1}\n"
                    "methods: [{name: simclr, config: {lr: 1e-3, batch_size: 6.4e1, milestones: [5e-1]}}]\n"
                    "protocols: {knn: {k: 1e1, temperature: 5e-2}}\n")
    assert yaml.safe_load(path.read_text())["methods"][0]["config"]["lr"] == "1e-3"
    (job,) = plan(load_suite(str(path)))
    config, knn = job.spec["config"], job.spec["protocols"]["knn"]
    assert (config["lr"], config["batch_size"], config["milestones"]) == (0.001, 64, [0.5])
    assert type(config["batch_size"]) is int and (knn["k"], knn["temperature"]) == (10, 0.05)
    assert type(knn["k"]) is int and job.spec["budget"] == {"steps": 20}


def test_a_val_fraction_and_image_size_pyyaml_reads_as_strings_are_used_as_numbers(tmp_path):
    """``val_fraction: 1e-1`` and ``image_size: 1.6e1`` (strings to PyYAML) are the numbers 0.1 and 16, as numeric
    strings are in configs and protocol parameters, and ``image_size: 16.0`` is 16. Catches the two keys refused
    with 'must be in [0, 1), got '1e-1'' while ``lr: 1e-3`` beside them was taken."""
    from harness.execution.runner import plan
    from harness.execution.suite import load_suite

    path = tmp_path / "s.yaml"
    for size in ("1.6e1", "16.0"):
        path.write_text(f"name: s\ndatasets: [digits]\nseeds: [0]\nbudget: {{steps: 1}}\nmethods: [random]\n"
                        f"protocols: {{knn: {{k: 5}}}}\nval_fraction: 1e-1\nimage_size: {size}\n")
        suite = load_suite(str(path))
        (job,) = plan(suite)
        assert (suite.val_fraction, suite.image_size, job.spec["val_fraction"], job.spec["image_size"]) == (0.1, 16, 0.1, 16)
        assert type(job.spec["image_size"]) is int


@pytest.mark.parametrize("value,default,expected", [
    ("1e-3", 0.06, 0.001), (1, 0.5, 1), ("1e3", 256, 1000), (64.0, 256, 64), (True, False, True),
    (["5e-1", 0.8], [0.1], [0.5, 0.8]), ("k-means++", "random", "k-means++"), ({"a": 1}, {}, {"a": 1}),
    ("anything", None, "anything"),
])
def test_values_take_the_type_of_their_declared_default(value, default, expected):
    """coerce_like by hand: numeric strings become numbers, integral floats become ints, ints stay
    ints for a float key (so specs written before keep their run ids). Catches: a YAML string left a
    string, 64.0 reaching a batch size."""
    from harness.execution.validate import coerce_like

    result = coerce_like(value, default, "key")
    assert result == expected and type(result) is type(expected)


@pytest.mark.parametrize("value,default,message", [
    (True, 256, "must be an integer"), (2.5, 256, "must be an integer"), ("true", False, "true or false"),
    (float("nan"), 0.1, "finite number"), ("inf", 0.1, "finite number"), (0.5, "sgd", "must be a string"),
    ("0.5", [0.1], "must be a list"), ([1], {}, "must be a mapping"),
])
def test_values_of_another_type_are_rejected(value, default, message):
    """Catches: True accepted as a batch size (bool subclasses int in Python), NaN or inf accepted
    as a rate, a number where a name belongs."""
    from harness.errors import UsageError
    from harness.execution.validate import coerce_like

    with pytest.raises(UsageError, match=message):
        coerce_like(value, default, "key")


@pytest.mark.parametrize("method,scale,overrides,message", [
    ("moco", "cpu", {"momentum": 1.5}, "'momentum' of method 'moco' must be in [0, 1], got 1.5"),
    ("simclr", "cpu", {"warmup": 1.2}, "'warmup' of method 'simclr' must be in [0, 1], got 1.2"),
    ("simclr", "cpu", {"milestones": [0.5, 1.5]}, "'milestones' of method 'simclr'[1] must be in [0, 1], got 1.5"),
    ("simclr", "cpu", {"temperature": 0}, "'temperature' of method 'simclr' must be positive, got 0"),
    ("npid_cld", "cpu", {"cld_temperature": 0}, "'cld_temperature' of method 'npid_cld' must be positive, got 0"),
    ("moco_cld", "paper", {"bn_splits": 0}, "'bn_splits' of method 'moco_cld' must be at least 1, got 0"),
    ("moco", "cpu", {"queue_sise": 8}, "unknown config key 'queue_sise' for method 'moco'"),
    ("simclr", "gpu", {}, "unknown scale 'gpu'"),
])
def test_method_configs_out_of_range_stop_with_one_line(method, scale, overrides, message):
    """resolve_config's checks by hand, at the bounds the CLI cases above do not reach: fractions of the budget
    above 1, a temperature of exactly 0 (also CLD's own ``cld_temperature``), a count whose declared default
    is 1 (moco_cld's paper ``bn_splits``: 0 groups would split the keys into nothing)."""
    from harness.errors import UsageError
    from methods import METHODS, resolve_config

    with pytest.raises(UsageError) as error:
        resolve_config(METHODS.get(method), scale, overrides)
    assert message in str(error.value)


def test_config_layers_override_in_order(tmp_path):
    """Shared training defaults < the method's own keys < its scale's defaults < the suite's config < the suite's
    dataset_config for that dataset (MoCo: momentum 0.9 shared, feat_dim 128 its own, temperature 0.07 own but
    0.1 at paper scale)."""
    from harness.execution.runner import plan
    from methods import METHODS, resolve_config
    from tests.conftest import make_suite

    paper = resolve_config(METHODS.get("moco"), "paper")
    assert (paper["momentum"], paper["feat_dim"], paper["temperature"], paper["batch_size"]) == (0.9, 128, 0.1, 512)
    assert resolve_config(METHODS.get("moco"), "paper", {"temperature": 0.2})["temperature"] == 0.2
    suite = make_suite([{"name": "moco", "config": {"temperature": 0.2, "ema": 0.9},
                         "dataset_config": {"digits": {"temperature": 0.3}}}], scale="paper")
    (job,) = plan(suite)
    assert (job.spec["config"]["temperature"], job.spec["config"]["ema"]) == (0.3, 0.9)


def test_an_adapter_whose_scale_sets_an_undeclared_key_is_refused_at_registration():
    """A scale default not declared under ``defaults['method']`` (nor a shared training key) is a typo in the
    adapter: refused when the class is registered, naming the key, not found when a suite overrides it."""
    from methods import METHODS, Method, register_method

    class Misspelt(Method):
        defaults = {"method": {"temperature": 0.1}, "paper": {}, "cpu": {"temprature": 0.2}}

    with pytest.raises(ValueError, match=r"cpu defaults set undeclared keys \['temprature'\]"):
        register_method("_misspelt_key")(Misspelt)
    assert "_misspelt_key" not in METHODS.names()


STEP_RETURNS = {  # training_step bodies of plugin adapters whose loss is not one: the line the run stops with
    "an int": ("return 3", "is int 3, not a tensor"),
    "None": ("return None", "is NoneType None, not a tensor"),
    "a loss per sample": ("return self.backbone(batch.views[0]).pow(2).mean(1)", "has shape (32,), not one element"),
    "a tensor without grad": ("return torch.tensor(1.0)", "does not require grad"),
}


@pytest.mark.parametrize("returns", STEP_RETURNS)
def test_a_plugin_loss_that_is_not_a_loss_stops_with_one_line(returns, tmp_path, capsys, monkeypatch):
    """A plugin whose training_step returns something other than a one-element tensor with grad: exit 2, one line
    naming the method and what came back, no record and no lock left. Catches the tracebacks from inside the loop
    and torch (AttributeError 'int' object has no attribute 'detach', shape '[]' is invalid for input of size 32,
    element 0 of tensors does not require grad)."""
    from methods import METHODS

    body, fragment = STEP_RETURNS[returns]
    name = "_returns_" + "_".join(returns.split())
    plugin = _write(tmp_path / f"{name}.py", _plugin(name, (
        f"class Returns(Method):\n    defaults = {{'method': {{}}, 'paper': {{}}, 'cpu': {{'batch_size': 32}}}}\n\n"
        f"    def training_step(self, batch):\n        import torch\n        {body}")))
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["--plugin", str(plugin), *_run(tmp_path, "--quiet", methods=[name])]) == 2
    finally:  # the next test process starts without it
        METHODS.unregister(name)
        sys.modules.pop(name, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"error: method {name!r}: the loss training_step returned {fragment}" in err, err
    assert not list(tmp_path.glob("r/**/*.json")) and not list(tmp_path.glob("r/s/.locks/*"))


def test_a_plugin_step_that_raises_is_one_line_naming_the_run_and_the_line_exit_1(tmp_path, capsys, monkeypatch):
    """An adapter whose training_step raises, in a suite whose other run (random) is stored first: exit 1, one
    line with the run, the exception and the plugin's file and line; the stored run is kept, the failing one has
    no record and no lock. Catches the traceback the CLI printed (README: never a traceback)."""
    from methods import METHODS

    plugin = _write(tmp_path / "raising.py", _plugin("_raising", (
        "class Raising(Method):\n    defaults = {'method': {}, 'paper': {}, 'cpu': {}}\n\n"
        "    def training_step(self, batch):\n        raise ValueError('adapter bug')")))
    monkeypatch.chdir(tmp_path)
    try:
        assert main(["--plugin", str(plugin), *_run(tmp_path, "--quiet", methods=["random", "_raising"])]) == 1
    finally:
        METHODS.unregister("_raising")
        sys.modules.pop("raising", None)
    err = capsys.readouterr().err
    assert err == "error: _raising on digits seed 0 (steps=1) raised ValueError: adapter bug (raising.py:8, in " \
                  "training_step); stored runs are kept, fix it and run again (SSL_HARNESS_TRACEBACK=1 adds the " \
                  "traceback)\n"
    (record,) = (tmp_path / "r" / "s").glob("*.json")
    assert json.loads(record.read_text())["spec"]["method"] == "random"
    assert not list(tmp_path.glob("r/s/.locks/*"))


def test_a_raising_adapters_traceback_is_printed_on_request(tmp_path, capsys, monkeypatch):
    """With SSL_HARNESS_TRACEBACK=1 the one line is followed by the whole traceback down to the adapter's own
    line, for its author; exit 1 as without it. Catches a switch that the README names but nothing reads."""
    from methods import METHODS

    plugin = _write(tmp_path / "raising_traced.py", _plugin("_raising_traced", (
        "class Raising(Method):\n    defaults = {'method': {}, 'paper': {}, 'cpu': {}}\n\n"
        "    def training_step(self, batch):\n        raise ValueError('adapter bug')")))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSL_HARNESS_TRACEBACK", "1")
    try:
        assert main(["--plugin", str(plugin), *_run(tmp_path, "--quiet", methods=["_raising_traced"])]) == 1
    finally:
        METHODS.unregister("_raising_traced")
        sys.modules.pop("raising_traced", None)
    first, *rest = capsys.readouterr().err.splitlines()
    assert first.endswith("stored runs are kept, fix it and run again") and rest[0] == "Traceback (most recent call last):"
    assert "raise ValueError('adapter bug')" in "\n".join(rest) and rest[-1] == "ValueError: adapter bug"


def test_a_run_that_raises_in_a_worker_pool_makes_the_exit_code_1(tmp_path, capsys, monkeypatch):
    """The same raising adapter with ``--workers 2``: the pool keeps going (the random run is stored and its table
    written) and says which run raised and where, but ``run`` exited 0, as if the suite had finished. Catches that
    exit code, and the run's line repeated (the pool's and the run's own prefix)."""
    from methods import METHODS

    plugin = _write(tmp_path / "raising_in_pool.py", _plugin("_raising_in_pool", (
        "class Raising(Method):\n    defaults = {'method': {}, 'paper': {}, 'cpu': {}}\n\n"
        "    def training_step(self, batch):\n        raise ValueError('adapter bug')")))
    monkeypatch.chdir(tmp_path)
    try:
        code = main(["--plugin", str(plugin), *_run(tmp_path, "--quiet", "--workers", "2",
                                                      methods=["random", "_raising_in_pool"])])
    finally:
        METHODS.unregister("_raising_in_pool")
        sys.modules.pop("raising_in_pool", None)
    err = capsys.readouterr().err
    assert code == 1 and "error: 1 of 2 jobs raised:\n  _raising_in_pool on digits seed 0 (steps=1) raised ValueError: " \
        "adapter bug (raising_in_pool.py:8, in training_step)" in err, err
    (record,) = (tmp_path / "r" / "s").glob("*.json")
    assert json.loads(record.read_text())["spec"]["method"] == "random" and (tmp_path / "l" / "s.md").is_file()


def test_a_checkpoint_larger_than_the_file_size_limit_is_one_line_exit_1_and_leaves_no_temp_file(tmp_path):
    """A file size limit (``ulimit -f``, as a full disk) reached while torch.save writes a run's checkpoint: torch's
    writer turned the short write into ``RuntimeError: unexpected pos`` (a traceback), so checkpoints are serialised
    first and written as bytes, whose OSError is one line. No checkpoint and no temporary file remain."""
    import resource

    def limit_file_size():  # 100 KB: the split manifest fits, SimCLR's checkpoint (~0.5 MB) does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out = subprocess.run([sys.executable, "-m", "harness", *_run(tmp_path, "--quiet", methods=["simclr"])],
                         capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
                         preexec_fn=limit_file_size, timeout=600)
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert out.stderr.startswith("error: cannot write ") and ".ckpt" in out.stderr and "File too large" in out.stderr
    assert not [p for p in (tmp_path / "r").rglob("*") if p.is_file()]


def test_an_augmentation_override_keyed_by_a_number_is_refused_by_the_config_itself():
    """``resolve_config`` (the API a suite, ``tune`` or a script goes through) refuses ``augment_overrides`` keyed by
    a number in one line, before the preset is built from them. Catches the TypeError ('keywords must be strings')
    the keyword unpacking raised."""
    from harness.errors import UsageError
    from methods import METHODS, resolve_config

    with pytest.raises(UsageError, match=r"method 'simclr': unknown augment_overrides key 1 \(valid: blur, "):
        resolve_config(METHODS.get("simclr"), "cpu", {"augment_overrides": {1: 0.5}})


def test_a_benchmark_output_in_an_unwritable_folder_is_the_environments_failure(tmp_path, monkeypatch):
    """``--out`` in a folder the process may not write to fails as the environment (exit 1, as ``run``'s results
    dir), where a path below a file is a bad value (exit 2). The folder's permission is stubbed, so that the check
    runs as root too. Catches both kinds reported alike."""
    import argparse

    from harness.errors import EnvironmentFailure
    from harness.execution import validate

    monkeypatch.setattr(validate.os, "access", lambda path, mode: False)
    with pytest.raises(EnvironmentFailure, match="is not a writable directory; fix its permissions"):
        validate.output_file(str(tmp_path / "x.md"))
    with pytest.raises(argparse.ArgumentTypeError, match="is a file, not a directory"):
        validate.output_file(str(_write(tmp_path / "f", b"") / "x.md"))
    assert main(["bench", "sinkhorn", "--out", str(tmp_path / "x.md")]) == 1


def test_an_image_folder_named_by_a_relative_path_is_that_folder(tmp_path, monkeypatch):
    """``imagefolder:.`` and ``imagefolder:tree`` name folders relative to where the command runs: the current
    folder's own name, not '' (the message said "dataset '' not found: looked for ."), and a relative tree loads
    as its absolute path does."""
    from harness.data.datasets import parse_dataset_name

    tree = image_tree(tmp_path / "tree", train=2, test=1)
    monkeypatch.chdir(tmp_path)
    assert parse_dataset_name("imagefolder:.") == ("imagefolder", tmp_path.resolve())
    assert parse_dataset_name("imagefolder:tree") == ("imagefolder", tree.resolve())
    assert len(load_dataset("imagefolder:tree", tmp_path / "d")) == len(load_dataset(f"imagefolder:{tree}",
                                                                                     tmp_path / "d2"))
