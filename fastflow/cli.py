"""The command line: ``python -m fastflow {train,sample,evaluate,plot,demo}``.

::

    python -m fastflow train --model maf --data moons --steps 2000 --out runs/maf
    python -m fastflow train --resume runs/maf --steps 4000      # continue the same run
    python -m fastflow sample runs/maf/checkpoint.pt --n 5000 --temperature 0.8
    python -m fastflow evaluate runs/maf/checkpoint.pt
    python -m fastflow plot runs/maf/checkpoint.pt
    python -m fastflow demo

Models (``--model``): see :data:`MODELS`; each has defaults for 2-D and tabular vectors and,
where it has an image architecture (``glow``, ``realnvp``, ``iresnet``, ``resflow``), for images;
the other models flatten images into vectors. Data (``--data``): a toy density
(:data:`fastflow.data.TOY_DATASETS`), ``digits`` (scikit-learn's 8x8 digits, 17 levels,
dequantised, reported in bits/dim), ``NAME:PATH`` for a tabular benchmark
(:func:`fastflow.data.load_tabular`), or the path of a ``.npy``/``.csv``/``.txt`` table
(standardised with the training part's statistics; NLLs are reported in the file's units).

A run writes into ``--out``: ``checkpoint.pt`` (model, optimiser, scheduler, step, the batch
sampler and every random generator's state, so that ``--resume`` continues exactly as an
uninterrupted run would: the same next loss, bit for bit on the same machine and thread count),
``history.json`` (per-step losses and the held-out evaluations) and, with matplotlib, PNG
pictures. Evaluation and pictures draw their randomness from a forked generator, so they never
change the training's random stream.

Expected user errors (a bad argument, a missing or corrupt checkpoint, an unreadable data file)
print a one-line message and exit with a non-zero status (2 for argument errors, with the usage
line, 1 otherwise), without a traceback.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import fastflow
from fastflow.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state

__all__ = ["MODELS", "IMAGE_MODELS", "main", "make_parser", "build_model", "load_dataset", "UsageError", "ArgumentError"]

#: ``--model`` values.
MODELS: tuple[str, ...] = ("realnvp", "glow", "maf", "iaf", "planar", "sylvester", "iresnet", "resflow", "ffjord")
#: Models with an image architecture (the rest flatten images into vectors; glow needs images).
IMAGE_MODELS: tuple[str, ...] = ("glow", "realnvp", "iresnet", "resflow")

CHECKPOINT_NAME = "checkpoint.pt"
HISTORY_NAME = "history.json"
_DIGITS_TEST_NOISE_SEED = 1234  # one fixed dequantisation of the held-out digits
_FILE_SPLIT_SEED = 0  # the permutation that splits a plain data file into train and test


class UsageError(Exception):
    """An expected user error: printed as one line, exit status 1."""


class ArgumentError(UsageError):
    """A bad command-line argument found after parsing: argparse's usage line and the message,
    exit status 2."""


# ---------------------------------------------------------------------------------------------
# per-model defaults


@dataclass(frozen=True)
class Recipe:
    """How a model is built and trained by default for one kind of data."""

    kwargs: dict[str, Any]
    lr: float
    batch_size: int
    steps: int
    warmup: int = 0
    clip: float | None = None
    weight_decay: float = 0.0
    note: str = ""


_VECTOR_RECIPES: dict[str, Recipe] = {
    "realnvp": Recipe({"n_couplings": 8, "hidden": 64}, 2e-3, 512, 2000),
    "maf": Recipe({"n_transforms": 5, "hidden": 64}, 5e-3, 512, 2000),
    # IAF's density needs D sequential passes per layer, and its fit is less stable: a
    # smaller learning rate
    "iaf": Recipe({"n_transforms": 5, "hidden": 64}, 1e-3, 512, 2000),
    "planar": Recipe({"n_transforms": 16}, 5e-3, 512, 3000),
    "sylvester": Recipe({"n_transforms": 8, "variant": "householder"}, 5e-3, 512, 3000),
    # i-ResNet: ELU branches with spectral norm 0.9, the biased truncated power series
    "iresnet": Recipe(
        {"n_blocks": 10, "hidden": 64, "n_hidden": 2, "coeff": 0.9, "activation": "elu",
         "estimator": "series", "n_terms": 5, "preact": False},
        2e-3, 256, 1000, weight_decay=1e-5,
    ),
    # Residual Flow: LipSwish, Russian-roulette unbiased log-det with the Neumann gradient
    "resflow": Recipe(
        {"n_blocks": 10, "hidden": 64, "n_hidden": 2, "coeff": 0.97, "estimator": "roulette"},
        2e-3, 256, 1000, weight_decay=1e-5,
    ),
    # FFJORD's 2-D setting: one CNF, 64-64-64 tanh concat-squash, T = 0.5 learned, dopri5 at
    # 1e-5; Hutchinson's divergence in training (a fifth of the exact trace's cost per step on
    # a CPU), the exact trace in evaluation where D <= 2
    "ffjord": Recipe(
        {"n_blocks": 1, "hidden": [64, 64, 64], "T": 0.5, "atol": 1e-5, "rtol": 1e-5,
         "estimator": "hutchinson"},
        2e-3, 256, 1000, weight_decay=1e-5,
    ),
}

_IMAGE_RECIPES: dict[str, Recipe] = {
    "glow": Recipe({"levels": 2, "depth": 8, "hidden": 64}, 1e-3, 64, 2000, warmup=100, clip=50.0),
    "realnvp": Recipe({"n_couplings": 8, "hidden": 64}, 1e-3, 64, 2000, warmup=100, clip=50.0),
    "iresnet": Recipe(
        {"levels": 2, "blocks_per_level": 4, "hidden": 32, "coeff": 0.9, "activation": "elu",
         "estimator": "series", "n_terms": 5, "preact": False},
        1e-3, 64, 1000, warmup=100, clip=50.0,
    ),
    "resflow": Recipe(
        {"levels": 2, "blocks_per_level": 4, "hidden": 32, "coeff": 0.98, "estimator": "roulette"},
        1e-3, 64, 1000, warmup=100, clip=50.0,
    ),
}


def recipe_for(model: str, image: bool) -> Recipe:
    """The default :class:`Recipe` of ``model`` for image or vector data."""
    if image and model in _IMAGE_RECIPES:
        return _IMAGE_RECIPES[model]
    if model == "glow":
        raise ArgumentError("--model glow is an image model: train it on image data (--data digits)")
    return _VECTOR_RECIPES[model]


def build_model(model: str, event_shape: Sequence[int], kwargs: dict[str, Any]) -> torch.nn.Module:
    """The model ``model`` for data of ``event_shape`` (``(D,)`` or ``(C, H, W)``)."""
    from fastflow import models

    shape = tuple(int(s) for s in event_shape)
    image = len(shape) == 3 and model in IMAGE_MODELS
    if image:
        cls = {"glow": models.Glow, "realnvp": models.RealNVPImage,
               "iresnet": models.ResidualFlowImage, "resflow": models.ResidualFlowImage}[model]
        return cls(shape, **kwargs)
    dim = math.prod(shape)
    kwargs = dict(kwargs)
    if model == "ffjord":
        kwargs["hidden"] = tuple(kwargs.get("hidden", (64, 64, 64)))
    cls = {"realnvp": models.RealNVP, "maf": models.MAF, "iaf": models.IAF,
           "planar": models.PlanarFlow, "sylvester": models.SylvesterFlow,
           "iresnet": models.ResidualFlow, "resflow": models.ResidualFlow,
           "ffjord": models.FFJORD}[model]
    return cls(dim, **kwargs)


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Dataset:
    """Training and held-out data of a run, and how batches are made from them."""

    spec: str
    kind: str  # "toy", "digits", "tabular", "file"
    train: torch.Tensor  # float [N, D], or uint8 [N, 1, 8, 8] levels for digits
    heldout: torch.Tensor  # the held-out part, ready for log_prob (dequantised once for digits)
    heldout_name: str
    event_shape: tuple[int, ...]
    n_bins: int | None = None  # image levels (digits: 17)
    shift: torch.Tensor | None = None  # standardisation of a plain file: x -> (x - shift) / scale
    scale: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image(self) -> bool:
        return len(self.event_shape) == 3

    @property
    def unit(self) -> str:
        return "bits/dim" if self.n_bins else "nats"

    @property
    def log_scale(self) -> float:
        """``sum log scale``: added to a standardised NLL to express it in the file's units."""
        return 0.0 if self.scale is None else float(self.scale.log().sum())

    def batch(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "digits":
            from fastflow.images import dequantize

            return dequantize(self.train[idx], n_bins=self.n_bins, generator=generator) - 0.5
        return self.train[idx]

    def nll(self, log_prob: torch.Tensor) -> torch.Tensor:
        """Per-sample NLL in :attr:`unit` from the model's log-density of prepared data."""
        if self.n_bins:
            from fastflow.images import bits_per_dim

            return bits_per_dim(log_prob, math.prod(self.event_shape), n_bins=self.n_bins)
        return -log_prob + self.log_scale

    def to_data_units(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space points back to the data's units (undo the standardisation)."""
        if self.shift is None:
            return x
        return x * self.scale.to(x) + self.shift.to(x)


def _toy(spec: str, seed: int) -> Dataset:
    from fastflow.data import toy_data

    x = toy_data(spec, 60_000, seed=seed)  # i.i.d. points: the first 50000 train, the rest test
    return Dataset(spec, "toy", x[:50_000].contiguous(), x[50_000:].contiguous(), "test", (2,))


def _digits(spec: str, split: str = "test") -> Dataset:
    from fastflow.data import DIGITS_LEVELS, load_digits
    from fastflow.images import dequantize

    train = load_digits("train")
    held = load_digits(split if split != "validation" else "test")
    noise = torch.Generator().manual_seed(_DIGITS_TEST_NOISE_SEED)
    heldout = dequantize(held, n_bins=DIGITS_LEVELS, generator=noise) - 0.5
    return Dataset(spec, "digits", train, heldout, "test", (1, 8, 8), n_bins=DIGITS_LEVELS)


def _tabular(spec: str, name: str, path: str, heldout: str) -> Dataset:
    from fastflow.data import load_tabular

    train = load_tabular(name, path, "train")
    held = load_tabular(name, path, heldout)
    return Dataset(spec, "tabular", train, held, heldout, (train.shape[1],))


def _file(spec: str, heldout: str) -> Dataset:
    from fastflow.data import load_array

    x = load_array(spec)
    n = x.shape[0]
    n_test = max(1, int(round(0.1 * n)))
    if n - n_test < 2:
        raise UsageError(f"{spec}: {n} rows are too few for a training and a test part")
    perm = torch.from_numpy(np.random.default_rng(_FILE_SPLIT_SEED).permutation(n))
    test, train = x[perm[:n_test]], x[perm[n_test:]]
    shift = train.mean(0)
    scale = train.std(0)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    held = train if heldout == "train" else test
    return Dataset(spec, "file", (train - shift) / scale, (held - shift) / scale, heldout if heldout == "train" else "test",
                   (x.shape[1],), shift=shift, scale=scale)


def describe_data_values() -> str:
    from fastflow.data import TABULAR_DATASETS, TOY_DATASETS

    return (f"a toy density ({', '.join(TOY_DATASETS)}), 'digits', NAME:PATH for a tabular data set "
            f"(NAME one of {', '.join(TABULAR_DATASETS)}), or a .npy/.csv/.txt file")


def check_data_spec(spec: str) -> str:
    """Raises UsageError unless ``spec`` names data this CLI can load (without loading it)."""
    from fastflow.data import TABULAR_DATASETS, TOY_DATASETS

    if spec in TOY_DATASETS or spec == "digits":
        return spec
    name, sep, path = spec.partition(":")
    if sep and name.lower() in TABULAR_DATASETS:
        if not os.path.exists(path):
            raise ArgumentError(f"--data {spec}: {path} does not exist")
        return spec
    if os.path.splitext(spec)[1].lower() in (".npy", ".csv", ".txt", ".tsv", ".dat", ".h5", ".hdf5"):
        if not os.path.isfile(spec):
            raise ArgumentError(f"--data {spec}: no such file")
        return spec
    raise ArgumentError(f"--data {spec!r} is not {describe_data_values()}")


def load_dataset(spec: str, seed: int, heldout: str = "test") -> Dataset:
    """The :class:`Dataset` of a ``--data`` value; ``heldout`` picks the held-out split of the
    data sets that have several (tabular: validation or test)."""
    from fastflow.data import TABULAR_DATASETS, TOY_DATASETS

    check_data_spec(spec)
    try:
        if spec in TOY_DATASETS:
            return _toy(spec, seed)
        if spec == "digits":
            return _digits(spec)
        name, sep, path = spec.partition(":")
        if sep and name.lower() in TABULAR_DATASETS:
            return _tabular(spec, name.lower(), path, heldout)
        return _file(spec, heldout)
    except (ValueError, FileNotFoundError) as exc:
        raise UsageError(f"--data {spec}: {exc}") from None


# ---------------------------------------------------------------------------------------------
# training state


class BatchSampler:
    """Batches of indices: epochs of a random permutation drawn from ``generator``, the last
    incomplete batch of an epoch dropped. Its state (permutation and position) goes into the
    checkpoint; the generator's state is saved with the other random generators."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator):
        self.n = n
        self.batch_size = min(batch_size, n)
        self.generator = generator
        self.perm: torch.Tensor | None = None
        self.pos = 0
        self.epoch = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.n // self.batch_size

    def next(self) -> torch.Tensor:
        if self.perm is None or self.pos + self.batch_size > self.n:
            self.perm = torch.randperm(self.n, generator=self.generator)
            self.pos = 0
            self.epoch += 1
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return idx

    def state_dict(self) -> dict[str, Any]:
        return {"perm": self.perm, "pos": self.pos, "epoch": self.epoch, "n": self.n, "batch_size": self.batch_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n or state["batch_size"] != self.batch_size:
            raise CheckpointError("the checkpoint's batch sampler does not match the data it was trained on")
        self.perm, self.pos, self.epoch = state["perm"], state["pos"], state["epoch"]


def _warmup_lambda(warmup: int):
    return lambda step: min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ArgumentError(f"--device {name!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ArgumentError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__})")
    return device


@contextlib.contextmanager
def _backend(name: str):
    try:
        ctx = fastflow.backend(name)
        ctx.__enter__()
    except (RuntimeError, ValueError) as exc:
        raise ArgumentError(f"--backend {name}: {exc}") from None
    try:
        yield
    finally:
        ctx.__exit__(None, None, None)


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, data: Dataset, x: torch.Tensor, device: torch.device,
                 batch_size: int = 2048, seed: int = 0) -> float:
    """Mean held-out NLL (nats or bits/dim) of ``x`` in eval mode, with randomness (estimators'
    probes) from a forked generator seeded with ``seed``: the training stream is untouched."""
    was_training = model.training
    model.eval()
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            parts = [data.nll(model.log_prob(_prep(chunk.to(device), model, data))).double().cpu()
                     for chunk in x.split(batch_size)]
    finally:
        model.train(was_training)
    return float(torch.cat(parts).mean())


def _prep(x: torch.Tensor, model: torch.nn.Module, data: Dataset) -> torch.Tensor:
    """Images for a vector model are flattened."""
    shape = getattr(model, "event_shape", None)
    if data.image and shape is not None and len(shape) == 1:
        return x.reshape(x.shape[0], -1)
    return x


def _unprep(x: torch.Tensor, data: Dataset) -> torch.Tensor:
    if data.image and x.dim() == 2:
        return x.reshape(x.shape[0], *data.event_shape)
    return x


# ---------------------------------------------------------------------------------------------
# checkpoints of runs


def checkpoint_path(path: str) -> str:
    """A checkpoint file, or a run directory holding ``checkpoint.pt``."""
    return os.path.join(path, CHECKPOINT_NAME) if os.path.isdir(path) else path


def _load_run(path: str) -> dict[str, Any]:
    state = load_checkpoint(checkpoint_path(path))
    for key in ("config", "model", "step"):
        if key not in state:
            raise CheckpointError(f"{path} is a fastflow checkpoint but not of a training run (no {key!r})")
    return state


def _restore_model(state: dict[str, Any], device: torch.device, heldout: str = "test"):
    config = state["config"]
    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    data = load_dataset(config["data"], config["seed"], heldout)
    model = build_model(config["model"], config["model_shape"], config["model_kwargs"]).to(device)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"the checkpoint's weights do not fit its model: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, data


# ---------------------------------------------------------------------------------------------
# progress


class _Progress:
    """A tqdm bar (``mode="bar"``, or ``"auto"`` when stderr is a terminal and tqdm is
    installed), a line every tenth of the run (``"lines"``, or ``"auto"`` otherwise), or
    nothing (``"off"``)."""

    def __init__(self, total: int, initial: int, mode: str):
        self.total, self.last_line = total, initial
        self.bar = None
        self.quiet = mode == "off"
        if mode == "bar" or (mode == "auto" and sys.stderr.isatty()):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print("(install tqdm for a progress bar: pip install tqdm)", file=sys.stderr)
            else:
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                mininterval=0.5, file=sys.stderr)

    def update(self, step: int, text: str) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif not self.quiet and (step - self.last_line >= max(1, self.total // 10) or step == self.total):
            self.last_line = step
            print(f"  step {step}/{self.total}  {text}", flush=True)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------------
# commands


def _parse_sets(items: Sequence[str]) -> dict[str, Any]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise ArgumentError(f"--set {item!r}: expected KEY=VALUE, e.g. --set hidden=128")
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value  # a bare word: a string
    return out


def _config_from_args(args: argparse.Namespace, data: Dataset) -> dict[str, Any]:
    recipe = recipe_for(args.model, data.image)
    kwargs = {**recipe.kwargs, **_parse_sets(args.set)}
    batch_size = args.batch_size or recipe.batch_size
    return {
        "model": args.model,
        "data": args.data,
        "model_shape": list(data.event_shape) if (data.image and args.model in IMAGE_MODELS)
        else [math.prod(data.event_shape)],
        "model_kwargs": kwargs,
        "lr": args.lr if args.lr is not None else recipe.lr,
        "batch_size": batch_size,
        "weight_decay": args.weight_decay if args.weight_decay is not None else recipe.weight_decay,
        "warmup": args.warmup if args.warmup is not None else recipe.warmup,
        "clip": args.clip if args.clip is not None else recipe.clip,
        "seed": args.seed,
        "threads": args.threads,
        "heldout": args.heldout,
        "unit": data.unit,
        "default_steps": recipe.steps,
    }


def _total_steps(args: argparse.Namespace, config: dict[str, Any], sampler: BatchSampler, previous: int | None) -> int:
    if args.steps is not None:
        return args.steps
    if args.epochs is not None:
        return args.epochs * sampler.steps_per_epoch
    return previous if previous is not None else config["default_steps"]


def _describe_model(config: dict[str, Any], model: torch.nn.Module) -> str:
    kw = ", ".join(f"{k}={v}" for k, v in config["model_kwargs"].items())
    return f"{config['model']} ({type(model).__name__}: {kw}; {_n_params(model):,} parameters)"


def cmd_train(args: argparse.Namespace) -> int:
    device = _device(args.device)
    resume = None
    if args.resume is not None:
        path = args.resume if isinstance(args.resume, str) else (args.out or ".")
        resume = _load_run(path)
        config = resume["config"]
        for name in ("model", "data"):
            given = getattr(args, name)
            if given is not None and given != config[name]:
                raise ArgumentError(f"--{name} {given} differs from the checkpoint's {config[name]}; "
                                 "a resumed run keeps its model and data")
        out = args.out or os.path.dirname(checkpoint_path(path)) or "."
    else:
        if args.model is None or args.data is None:
            raise ArgumentError("train needs --model and --data (or --resume CHECKPOINT)")
        check_data_spec(args.data)
        out = args.out or os.path.join("runs", f"{args.model}-{os.path.basename(args.data).replace(':', '-')}")
        config = None
    os.makedirs(out, exist_ok=True)
    # a resumed run keeps its thread count unless told otherwise (and so its speed: on a busy
    # machine two threads can be several times slower than one for small models)
    threads = args.threads or (config.get("threads") if config else None)
    if threads:
        torch.set_num_threads(threads)
    seed = config["seed"] if config else args.seed
    # every global generator starts from the seed (a resumed run restores their states below)
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    data = load_dataset(config["data"] if config else args.data, seed, (config or vars(args))["heldout"])
    if config is None:
        config = _config_from_args(args, data)

    with _backend(args.backend):
        model = build_model(config["model"], config["model_shape"], config["model_kwargs"]).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_lambda(config["warmup"]))
        data_gen = torch.Generator().manual_seed(seed)
        sampler = BatchSampler(data.train.shape[0], config["batch_size"], data_gen)
        heldout = data.heldout.to(device)
        if resume is not None:
            try:
                model.load_state_dict(resume["model"])
                opt.load_state_dict(resume["optimizer"])
                sched.load_state_dict(resume["scheduler"])
                sampler.load_state_dict(resume["sampler"])
                set_rng_state(resume["rng"], {"data": data_gen})
            except (KeyError, RuntimeError, ValueError) as exc:
                raise CheckpointError(f"the checkpoint cannot be resumed: {str(exc).splitlines()[0]}") from None
            step, history = int(resume["step"]), resume["history"]
            total = _total_steps(args, config, sampler, resume["config"].get("steps"))
        else:
            step, history = 0, {"loss": [], "eval": [], "seconds": 0.0}
            total = _total_steps(args, config, sampler, None)
            # data-dependent initialisation (ActNorm) on up to 512 training rows
            init_idx = torch.randperm(data.train.shape[0], generator=data_gen)[:512]
            init = data.batch(init_idx, data_gen).to(device)
            from fastflow.nn import initialize_actnorm

            initialize_actnorm(model, _prep(init, model, data))
        config["steps"] = total
        eval_every = args.eval_every or max(1, total // 10)
        ckpt_every = args.checkpoint_every or eval_every
        ckpt_file = os.path.join(out, CHECKPOINT_NAME)
        _remove_stale_temporaries(out)

        def save() -> None:
            save_checkpoint(ckpt_file, {
                "config": config, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "sampler": sampler.state_dict(), "step": step,
                "rng": rng_state({"data": data_gen}), "history": history,
                "versions": {"fastflow": str(fastflow.__version__), "torch": str(torch.__version__)},
            })
            # atomically, as the checkpoint: a run killed mid-write leaves the previous file
            path = os.path.join(out, HISTORY_NAME)
            with open(path + ".tmp", "w") as f:
                json.dump({"unit": config["unit"], **history}, f)
            os.replace(path + ".tmp", path)

        def evaluate() -> float:
            value = evaluate_nll(model, data, heldout, device, seed=seed)
            history["eval"].append({"step": step, "value": value})
            return value

        native = fastflow.native_available()
        print(f"fastflow {fastflow.__version__} train: {_describe_model(config, model)}")
        print(f"  data {config['data']}: {data.train.shape[0]:,} training / {heldout.shape[0]:,} "
              f"{data.heldout_name} rows, shape {tuple(data.event_shape)}; NLL in {data.unit}")
        print(f"  {'resuming at step ' + str(step) + ' of ' if resume else ''}{total} steps of batch "
              f"{sampler.batch_size} ({sampler.steps_per_epoch} per epoch); Adam lr {config['lr']:g}"
              f"{', weight decay %g' % config['weight_decay'] if config['weight_decay'] else ''}"
              f"{', warm-up %d' % config['warmup'] if config['warmup'] else ''}"
              f"{', clip %g' % config['clip'] if config['clip'] else ''}; device {device}, backend "
              f"{args.backend} (native: {', '.join(native) or 'none'}), {torch.get_num_threads()} thread(s), seed {seed}")
        print(f"  output: {os.path.abspath(out)}")
        if step == 0 and total > 0 and not args.no_eval:
            print(f"  step 0: held-out NLL {evaluate():.4f} {data.unit}")

        progress = _Progress(total, step, args.progress)
        start = time.perf_counter()
        seconds0 = history.get("seconds", 0.0)
        steps_done = 0
        last_eval = history["eval"][-1]["value"] if history["eval"] else float("nan")
        model.train()
        try:
            while step < total:
                x = data.batch(sampler.next(), data_gen).to(device)
                loss = data.nll(model.log_prob(_prep(x, model, data))).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if config["clip"]:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config["clip"])
                opt.step()
                sched.step()
                step += 1
                steps_done += 1
                value = loss.item()
                history["loss"].append(value)
                if not math.isfinite(value):
                    progress.close()
                    save()
                    raise UsageError(f"training diverged at step {step} (loss {value}); try a smaller --lr "
                                     f"(now {config['lr']:g}) or --clip; checkpoint saved to {ckpt_file}")
                rate = steps_done * sampler.batch_size / max(time.perf_counter() - start, 1e-9)
                progress.update(step, f"loss {value:.3f}, held-out {last_eval:.3f} {data.unit}, {rate:,.0f} samples/s")
                if not args.no_eval and (step % eval_every == 0 or step == total):
                    last_eval = evaluate()
                    progress.write(f"  step {step}: held-out NLL {last_eval:.4f} {data.unit}")
                if step % ckpt_every == 0 or step == total:
                    history["seconds"] = seconds0 + time.perf_counter() - start
                    save()
        except KeyboardInterrupt:
            progress.close()
            history["seconds"] = seconds0 + time.perf_counter() - start
            save()
            print(f"\ninterrupted at step {step}; checkpoint {ckpt_file}; continue with: "
                  f"python -m fastflow train --resume {out}", file=sys.stderr)
            return 130
        progress.close()
        elapsed = time.perf_counter() - start
        history["seconds"] = seconds0 + elapsed
        save()
        rate = steps_done * sampler.batch_size / max(elapsed, 1e-9)
        summary = f"done: step {step}/{total}, {steps_done} steps in {elapsed:.1f} s ({rate:,.0f} samples/s)"
        if history["eval"]:
            summary += f"; held-out NLL {history['eval'][-1]['value']:.4f} {data.unit}"
        print(summary)
        print(f"checkpoint: {os.path.abspath(ckpt_file)}")
        if not args.no_plot:
            paths = _pictures(model, data, history, out, config, device, kinds=("all",), quiet=True)
            for p in paths:
                print(f"picture: {os.path.abspath(p)}")
    return 0


def _remove_stale_temporaries(out: str) -> None:
    """Deletes the temporary files of a run killed while writing its checkpoint or history (the
    files themselves are replaced atomically, so they are whole; a temporary is debris)."""
    for name in os.listdir(out):
        if (name.startswith(".tmp-") and name.endswith(".ckpt")) or name == HISTORY_NAME + ".tmp":
            try:
                os.unlink(os.path.join(out, name))
            except OSError:
                pass


def _pictures(model, data: Dataset, history, out: str, config, device, kinds=("all",), quiet=False,
              temperature: float = 1.0, n: int | None = None, seed: int = 0) -> list[str]:
    try:
        from fastflow import plots
        plots._figure(1, 1)
    except ImportError as exc:
        print(f"pictures skipped: {exc}", file=sys.stderr)
        return []
    want = set(kinds)
    every = "all" in want
    paths = []
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        if (every or "curve" in want) and history and history.get("loss"):
            paths.append(plots.plot_training_curve(history, os.path.join(out, "curve.png"), unit=data.unit))
        if data.image:
            def post(x):
                return _unprep(x, data)
            if every or "samples" in want:
                with torch.no_grad():
                    x = _unprep(model.sample(n or 64, temperature=temperature), data)
                paths.append(plots.plot_image_grid(
                    x, os.path.join(out, "samples.png"), n_cols=8, value_range=(-0.5, 0.5),
                    title=f"{config['model']} samples, T={temperature:g}"))
            if every or "temperature" in want:
                paths.append(plots.plot_temperature_grid(model, os.path.join(out, "temperature.png"),
                                                         postprocess=post, seed=seed))
        else:
            test = data.to_data_units(data.heldout).cpu()
            if data.event_shape == (2,) and (every or "density" in want):
                def log_prob(x):
                    z = (x - data.shift.to(x)) / data.scale.to(x) if data.shift is not None else x
                    return model.log_prob(z) - data.log_scale
                n_grid = 100 if config["model"] == "ffjord" else 200
                paths.append(plots.plot_density(
                    model, test, os.path.join(out, "density.png"), n_grid=n_grid, samples=False,
                    log_prob=log_prob, title=f"{config['model']} density"))
            s = None
            if every or "samples" in want:
                try:
                    with torch.no_grad():
                        s = data.to_data_units(model.sample(n or min(5000, test.shape[0]), temperature=temperature)).cpu()
                except (fastflow.InverseNotAvailable, fastflow.ConvergenceError) as exc:
                    print(f"samples picture skipped: {config['model']} cannot sample ({exc})", file=sys.stderr)
            if s is not None:
                paths.append(plots.plot_samples(
                    s[:, :2], os.path.join(out, "samples.png"), data=test[:, :2],
                    title=f"{config['model']}: {s.shape[0]} samples, T={temperature:g}"
                    + ("" if data.event_shape == (2,) else " (first two features)")))
    return paths


def cmd_sample(args: argparse.Namespace) -> int:
    device = _device(args.device)
    state = _load_run(args.checkpoint)
    torch.manual_seed(args.seed)
    with _backend(args.backend):
        model, data = _restore_model(state, device)
        try:
            with torch.no_grad():
                x = model.sample(args.n, temperature=args.temperature)
        except (fastflow.InverseNotAvailable, fastflow.ConvergenceError) as exc:
            raise UsageError(f"{state['config']['model']} cannot sample: {exc}") from None
        x = _unprep(x, data)
        x = data.to_data_units(x).cpu() if not data.image else (x + 0.5).clamp(0, 1).cpu()
    run_dir = os.path.dirname(checkpoint_path(args.checkpoint)) or "."
    out = args.out or os.path.join(run_dir, f"samples_n{args.n}_T{args.temperature:g}.npy")
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    if out.endswith(".pt"):
        torch.save(x, out)
    elif out.endswith((".csv", ".txt")):
        np.savetxt(out, x.reshape(x.shape[0], -1).numpy(), delimiter="," if out.endswith(".csv") else " ")
    else:
        np.save(out, x.numpy())
    what = "images in [0, 1]" if data.image else "points"
    print(f"{args.n} {what} of shape {tuple(x.shape[1:])} at temperature {args.temperature:g}: {os.path.abspath(out)}")
    if not data.image:
        mean = ", ".join(f"{v:.3f}" for v in x.mean(0)[:4].tolist())
        print(f"  sample mean [{mean}{', ...' if x.shape[1] > 4 else ''}]")
    if not args.no_plot:
        try:
            from fastflow import plots
            plots._figure(1, 1)
        except ImportError as exc:
            print(f"picture skipped: {exc}", file=sys.stderr)
            return 0
        png = args.plot or os.path.splitext(out)[0] + ".png"
        title = f"{state['config']['model']}: {args.n} samples, T={args.temperature:g}"
        if data.image:
            shown = min(100, args.n)
            if shown < args.n:
                title = f"{state['config']['model']}: {shown} of {args.n} samples, T={args.temperature:g}"
            plots.plot_image_grid(x[:shown], png, n_cols=10, title=title)
        else:
            ref = data.to_data_units(data.heldout).cpu()
            plots.plot_samples(x[:, :2], png, data=ref[:, :2], title=title)
        print(f"picture: {os.path.abspath(png)}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = _device(args.device)
    state = _load_run(args.checkpoint)
    split = args.split
    with _backend(args.backend):
        model, data = _restore_model(state, device, "validation" if split == "validation" else "test")
        if split == "train":
            x = data.train if data.kind != "digits" else data.batch(
                torch.arange(data.train.shape[0]), torch.Generator().manual_seed(_DIGITS_TEST_NOISE_SEED))
            name = "train"
        else:
            if split == "validation" and data.kind != "tabular":
                raise ArgumentError(f"--split validation: {data.spec} has no validation part (use test or train)")
            x, name = data.heldout, data.heldout_name
        start = time.perf_counter()
        value = evaluate_nll(model, data, x.to(device), device, batch_size=args.batch_size, seed=args.seed)
        elapsed = time.perf_counter() - start
    config = state["config"]
    result = {"checkpoint": os.path.abspath(checkpoint_path(args.checkpoint)), "model": config["model"],
              "data": config["data"], "step": state["step"], "split": name, "n": int(x.shape[0]),
              "nll": value, "unit": data.unit, "seconds": round(elapsed, 3)}
    print(f"{config['model']} on {config['data']} after {state['step']} steps: {name} NLL "
          f"{value:.4f} {data.unit} ({x.shape[0]:,} rows, {elapsed:.1f} s)")
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    device = _device(args.device)
    state = _load_run(args.checkpoint)
    out = args.out or os.path.dirname(checkpoint_path(args.checkpoint)) or "."
    os.makedirs(out, exist_ok=True)
    with _backend(args.backend):
        model, data = _restore_model(state, device)
        try:
            from fastflow import plots
            plots._figure(1, 1)
        except ImportError as exc:
            raise UsageError(str(exc)) from None
        paths = _pictures(model, data, state.get("history"), out, state["config"], device,
                          kinds=tuple(args.kind), temperature=args.temperature, seed=args.seed)
    if not paths:
        raise UsageError(f"no picture of kind {', '.join(args.kind)} for {state['config']['model']} on {data.spec}")
    for p in paths:
        print(f"picture: {os.path.abspath(p)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from fastflow import demo

    return demo.run(args)


# ---------------------------------------------------------------------------------------------
# the parser


def _number(cast, ok, what: str):
    """An argparse type: ``cast(text)`` that must satisfy ``ok``, else "expected {what}"."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text}")
        return value

    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N")
    p.add_argument("--backend", default="auto", choices=("auto", "native", "reference"),
                   help="fastflow operators: auto (native where built, default), native, reference")


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m fastflow``."""
    from fastflow.data import TOY_DATASETS

    parser = argparse.ArgumentParser(
        prog="python -m fastflow",
        description="Train, sample, evaluate and draw normalizing flows.",
        epilog="Run 'python -m fastflow COMMAND --help' for a command's options.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser("train", help="train a model (or resume a run)",
                       description="Train a flow by maximum likelihood with Adam; write checkpoints, "
                       "the training history and pictures into --out.")
    t.add_argument("--model", choices=MODELS, help="the flow family")
    t.add_argument("--data", help=f"{', '.join(TOY_DATASETS)}, digits, NAME:PATH (power, gas, hepmass, "
                   "miniboone, bsds300), or a .npy/.csv/.txt file")
    length = t.add_mutually_exclusive_group()
    length.add_argument("--steps", type=_non_negative_int, help="total optimiser steps (default: the model's)")
    length.add_argument("--epochs", type=_positive_int, help="total epochs over the training part")
    t.add_argument("--batch-size", type=_positive_int, help="batch size (default: the model's)")
    t.add_argument("--lr", type=_positive_float, help="Adam learning rate (default: the model's)")
    t.add_argument("--weight-decay", type=_non_negative_float, help="Adam weight decay (default: the model's)")
    t.add_argument("--warmup", type=_non_negative_int, help="linear learning-rate warm-up steps")
    t.add_argument("--clip", type=_positive_float, help="gradient-norm clip (default: the model's)")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a model constructor argument, e.g. --set hidden=128 (repeatable)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data, the model and training (default 0)")
    t.add_argument("--out", help="run directory (default runs/MODEL-DATA)")
    t.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the run in --out, or the given checkpoint file or run directory")
    t.add_argument("--heldout", default="test", choices=("test", "validation"),
                   help="held-out split evaluated during training (tabular data: validation or test)")
    t.add_argument("--eval-every", type=_positive_int, help="steps between held-out evaluations (default: a tenth)")
    t.add_argument("--checkpoint-every", type=_positive_int, help="steps between checkpoints (default: --eval-every)")
    t.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's)")
    t.add_argument("--no-eval", action="store_true", help="skip the held-out evaluations")
    t.add_argument("--no-plot", action="store_true", help="write no pictures")
    t.add_argument("--progress", default="auto", choices=("auto", "bar", "lines", "off"),
                   help="a tqdm progress bar (bar), a line per tenth of the run (lines), or nothing "
                   "(off); auto (default): the bar on a terminal, lines otherwise")
    _common(t)
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("sample", help="draw samples from a checkpoint",
                       description="Draw samples; write them (.npy, .pt or .csv) and a picture.")
    s.add_argument("checkpoint", help="a checkpoint file or run directory")
    s.add_argument("--n", type=_positive_int, default=1000, help="number of samples (default 1000)")
    s.add_argument("--temperature", type=_non_negative_float, default=1.0,
                   help="scale of the base distribution's std (default 1)")
    s.add_argument("--out", help="output file (default RUN/samples_nN_TT.npy)")
    s.add_argument("--plot", help="picture file (default: the output's name with .png)")
    s.add_argument("--no-plot", action="store_true", help="write no picture")
    s.add_argument("--seed", type=int, default=0)
    _common(s)
    s.set_defaults(func=cmd_sample)

    e = sub.add_parser("evaluate", help="held-out NLL of a checkpoint",
                       description="The mean negative log-likelihood of a split, in nats or bits/dim.")
    e.add_argument("checkpoint", help="a checkpoint file or run directory")
    e.add_argument("--split", default="test", choices=("test", "validation", "train"))
    e.add_argument("--batch-size", type=_positive_int, default=2048)
    e.add_argument("--seed", type=int, default=0, help="seed of the estimators' probes (default 0)")
    e.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    _common(e)
    e.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("plot", help="pictures of a checkpoint",
                       description="2-D data: density beside the data, samples, training curve; "
                       "images: sample grid, temperature sweep, training curve.")
    p.add_argument("checkpoint", help="a checkpoint file or run directory")
    p.add_argument("--kind", nargs="+", default=["all"],
                   choices=("all", "density", "samples", "temperature", "curve"))
    p.add_argument("--out", help="directory of the pictures (default: the run directory)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=cmd_plot)

    d = sub.add_parser("demo", help="a short end-to-end demo",
                       description="Train two flow families on a 2-D density through this CLI, draw "
                       "them, and time a training step on the native operators and the reference.")
    from fastflow.demo import add_arguments

    add_arguments(d)
    d.set_defaults(func=cmd_demo)
    parser.commands = {"train": t, "sample": s, "evaluate": e, "plot": p, "demo": d}
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status (argument errors raise ``SystemExit(2)``
    with argparse's usage message)."""
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ArgumentError as exc:
        parser.commands[args.command].error(str(exc))  # usage line, message, SystemExit(2)
    except UsageError as exc:
        print(f"fastflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (CheckpointError, FileNotFoundError, IsADirectoryError, ImportError) as exc:
        print(f"fastflow {args.command}: error: {exc}", file=sys.stderr)
        return 1
