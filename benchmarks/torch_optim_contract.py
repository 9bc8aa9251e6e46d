"""PyTorch's own optimizer contract tests, run against SeqReptile and Reptile.

PyTorch checks every ``torch.optim`` optimizer with the generic tests of ``TestOptimRenewed``
in its ``test/test_optim.py`` (state dicts, hooks, LR schedulers, param groups, tensor LRs,
foreach/fused parity, ...), driven by the ``OptimizerInfo`` entries of
``torch.testing._internal.common_optimizers.optim_db``. This script runs them on CPU with
each wrapper in place of its inner optimizer: the wrapper's ``OptimizerInfo`` is the inner
optimizer's (same kwargs, inputs, decorators) with ``optim_cls`` replaced by a factory that
builds ``Wrapper(Inner(params, **kwargs), ...)``. The plain inner optimizers run as a control.

The test file is not part of this repository and not in the torch wheel: take it from a
PyTorch checkout at the tag of the installed torch (it must match the installed
``common_optimizers.py``), e.g.::

    python -c "import torch; print(torch.__version__)"    # e.g. 2.13.0 -> tag v2.13.0
    git clone --depth 1 --branch v2.13.0 https://github.com/pytorch/pytorch /tmp/pytorch
    pip install expecttest                                  # needed by torch's test utils
    OMP_NUM_THREADS=1 python -m benchmarks.torch_optim_contract \
        --test-file /tmp/pytorch/test/test_optim.py [-k PATTERN]

Only ``TestOptimRenewed`` runs (its sibling imports ``optim.test_*`` are stubbed out); tests
needing CUDA, fused or capturable support skip on CPU. ``-k`` takes unittest patterns
(a substring, or an fnmatch pattern with ``*``), repeatable, e.g. ``-k SeqReptile``.
Prints, per optimizer, the tests run (passed + failed + errors + skipped) and each outcome,
then one line per failing test. Exits 1 if any test failed or errored (controls included)
or none ran.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import types
import unittest
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch.optim import SGD, AdamW, Optimizer

from torch_seqreptile import Reptile, SeqReptile

OUTCOMES = ("passed", "failed", "errors", "skipped")


@dataclass(frozen=True)
class Config:
    """One optimizer under test: ``wrapper(inner(params, **kw), **wrapper_kwargs)``."""

    name: str  # the OptimizerInfo's name, i.e. the optimizer part of every test name
    inner: type[Optimizer]
    wrapper: Callable[..., Optimizer] | None = None  # None: the plain inner optimizer (control)
    wrapper_kwargs: dict[str, Any] = field(default_factory=dict)


#: outer_lr=1 (with one task for Reptile) is plain training: a test failing at 0.5 but
#: passing at 1 compares against the inner optimizer's trajectory, not the contract.
CONFIGS: tuple[Config, ...] = (
    Config("AdamW", AdamW),
    Config("SGD", SGD),
    Config("SeqReptile_AdamW_K2_eta0p5", AdamW, SeqReptile, {"inner_steps": 2, "outer_lr": 0.5}),
    Config("SeqReptile_AdamW_K2_eta1", AdamW, SeqReptile, {"inner_steps": 2, "outer_lr": 1.0}),
    Config("SeqReptile_AdamW_K1_eta0p5", AdamW, SeqReptile, {"inner_steps": 1, "outer_lr": 0.5}),
    Config(
        "Reptile_SGD_K2_eta0p5_T1",
        SGD,
        Reptile,
        {"inner_steps": 2, "outer_lr": 0.5, "num_tasks": 1},
    ),
    Config(
        "Reptile_SGD_K2_eta1_T1", SGD, Reptile, {"inner_steps": 2, "outer_lr": 1.0, "num_tasks": 1}
    ),
)


def factory(config: Config) -> type:
    """A class named like the inner optimizer whose construction builds the wrapper.

    The tests branch on ``optim_cls.__name__`` (``"AdamW"``, ``"SGD"``, ...), so the factory
    keeps the inner optimizer's name; the test names use the ``OptimizerInfo``'s instead.
    """
    wrapper, inner, kwargs = config.wrapper, config.inner, config.wrapper_kwargs
    assert wrapper is not None

    def __new__(cls: type, params: Any, *args: Any, **inner_kwargs: Any) -> Optimizer:
        return wrapper(inner(params, *args, **inner_kwargs), **kwargs)

    namespace = {"__new__": __new__, "__module__": inner.__module__, "__doc__": config.name}
    return type(inner.__name__, (), namespace)


def optimizer_infos(configs: Sequence[Config]) -> list[Any]:
    """``OptimizerInfo``s for ``configs``, each a copy of its inner optimizer's entry."""
    from torch.testing._internal import common_optimizers

    base: dict[Any, Any] = {info.optim_cls: info for info in common_optimizers.optim_db}

    class NamedInfo(common_optimizers.OptimizerInfo):
        _name: str

        def __init__(self, info: Any, optim_cls: type, name: str) -> None:
            vars(self).update(vars(info), optim_cls=optim_cls, _name=name)

        @property
        def name(self) -> str:
            return self._name

    infos = []
    for config in configs:
        info = base[config.inner]
        if config.wrapper is None:
            infos.append(info)
        else:
            infos.append(NamedInfo(info, factory(config), config.name))
    return infos


def load_test_class(test_file: Path, infos: list[Any]) -> type[unittest.TestCase]:
    """Import ``test_file`` with ``optim_db`` replaced by ``infos``; return its CPU class."""
    from torch.testing._internal import common_optimizers
    from torch.testing._internal.common_utils import TestCase

    saved_db, saved_env = (
        common_optimizers.optim_db,
        os.environ.get("PYTORCH_TESTING_DEVICE_ONLY_FOR"),
    )
    stubs: dict[str, types.ModuleType] = {"optim": types.ModuleType("optim")}
    stubs["optim"].__path__ = []
    for stem, name in (
        ("test_lrscheduler", "TestLRScheduler"),
        ("test_optim", "TestDifferentiableOptimizer"),
        ("test_swa_utils", "TestSWAUtils"),
    ):
        stub = stubs[f"optim.{stem}"] = types.ModuleType(f"optim.{stem}")
        setattr(stub, name, type(name, (TestCase,), {}))
    saved_modules = {key: sys.modules.get(key) for key in stubs}
    common_optimizers.optim_db = infos  # read by the test file's decorators at import
    os.environ["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = "cpu"
    sys.modules.update(stubs)
    try:
        spec = importlib.util.spec_from_file_location("torch_test_optim", test_file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        common_optimizers.optim_db = saved_db
        if saved_env is None:
            os.environ.pop("PYTORCH_TESTING_DEVICE_ONLY_FOR", None)
        else:
            os.environ["PYTORCH_TESTING_DEVICE_ONLY_FOR"] = saved_env
        for key, value in saved_modules.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    test_class: type[unittest.TestCase] = module.TestOptimRenewedCPU
    return test_class


def group_of(test_name: str, names: Sequence[str]) -> str | None:
    """The config whose name is the optimizer part of ``test_name`` (``..._NAME_cpu_dtype``)."""
    matches = [name for name in names if f"_{name}_cpu_" in test_name]
    return max(matches, key=len, default=None)


class Result(unittest.TextTestResult):
    """Records the outcome and, for failures, the message of every test."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.messages: dict[str, str] = {}

    def _record(self, test: unittest.TestCase, outcome: str, message: str = "") -> None:
        name = test.id().rsplit(".", 1)[-1]
        if self.outcomes.get(name) in ("failed", "errors"):
            return  # a failed subtest stays failed
        self.outcomes[name] = outcome
        if message:
            self.messages[name] = message

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self._record(test, "passed")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self._record(test, "failed", self.failures[-1][1])

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self._record(test, "errors", self.errors[-1][1])

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self._record(test, "skipped", reason)

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self._record(test, "passed")  # an OptimizerInfo's expectedFailure, as declared

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self._record(test, "failed", "unexpected success of an expectedFailure")

    def addSubTest(self, test: Any, subtest: Any, err: Any) -> None:
        super().addSubTest(test, subtest, err)
        if err is not None:
            failed = issubclass(err[0], test.failureException)
            listed = self.failures if failed else self.errors
            self._record(test, "failed" if failed else "errors", listed[-1][1])


@dataclass
class Summary:
    counts: dict[str, Counter[str]]  # config name -> outcome -> number of tests
    failures: dict[str, str]  # failed or errored test -> traceback

    @property
    def ok(self) -> bool:
        return not self.failures and any(sum(c.values()) for c in self.counts.values())

    def table(self) -> str:
        width = max(len("optimizer"), *map(len, self.counts))
        lines = [f"{'optimizer':<{width}}   ran " + " ".join(f"{o:>7}" for o in OUTCOMES)]
        for name, counts in self.counts.items():
            row = " ".join(f"{counts[o]:>7}" for o in OUTCOMES)
            lines.append(f"{name:<{width}} {sum(counts.values()):>5} {row}")
        return "\n".join(lines)


def run(
    test_file: Path,
    patterns: Sequence[str] = (),
    configs: Sequence[Config] = CONFIGS,
    verbosity: int = 1,
) -> Summary:
    """Run ``TestOptimRenewed`` on CPU for ``configs`` (tests matching ``patterns``)."""
    names = [config.name for config in configs]
    test_class = load_test_class(test_file, optimizer_infos(configs))
    loader = unittest.TestLoader()
    loader.testNamePatterns = [p if "*" in p else f"*{p}*" for p in patterns] or None
    suite = unittest.TestSuite(
        test
        for test in loader.loadTestsFromTestCase(test_class)
        if isinstance(test, unittest.TestCase) and group_of(test.id(), names) is not None
    )
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=verbosity, resultclass=Result)
    result = runner.run(suite)
    assert isinstance(result, Result)
    counts: dict[str, Counter[str]] = {name: Counter() for name in names}
    for test_name, outcome in result.outcomes.items():
        counts[str(group_of(test_name, names))][outcome] += 1
    failures = {
        name: result.messages[name]
        for name, outcome in sorted(result.outcomes.items())
        if outcome in ("failed", "errors")
    }
    return Summary(counts, failures)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test-file", type=Path, required=True, help="PyTorch's test_optim.py")
    parser.add_argument("-k", dest="patterns", action="append", default=[], help="test filter")
    parser.add_argument("-v", "--verbose", action="store_true", help="one line per test")
    args = parser.parse_args(argv)
    summary = run(args.test_file, args.patterns, verbosity=2 if args.verbose else 1)
    print("\n" + summary.table())
    for test_name, message in summary.failures.items():
        print(f"FAIL {test_name}: {message.strip().splitlines()[-1][:300]}")
    return 0 if summary.ok else 1


if __name__ == "__main__":
    sys.exit(main())
