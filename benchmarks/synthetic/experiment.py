"""The 2-D synthetic experiment of Lee et al. (2022), Sec. 4.1 and Fig. 3.

Three tasks L_i(phi) = -200 exp(-0.2 ||phi - x_i||_2) with x_1 = (0, 10), x_2 = (0, 0),
x_3 = (10, 0); the MTL loss is their sum; every method starts at (20, 5). (The paper prints
exp(+0.2 ||.||), which has no minima; its Fig. 3 shows minima at the x_i, so we use the
minus sign.)

Every method runs through the library's public API with plain SGD (lr ``alpha``) as its
inner/base optimizer and the same budget of *task-gradient evaluations*: a multi-task step
(MTL, GradNorm, PCGrad, GradVac, RecAdam) evaluates all three task gradients, an inner step
of Reptile / Sequential Reptile evaluates one, and STL spends the budget on each task alone.

Run ``python -m benchmarks.synthetic.experiment`` (about a minute). It writes
``synthetic.json``, ``synthetic.md`` and ``synthetic.png`` to ``--out``
(default ``docs/results``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from torch_seqreptile import RecAdam, Reptile, SeqReptile
from torch_seqreptile.surgery import MTL, GradNorm, GradVac, PCGrad

MINIMA = torch.tensor([[0.0, 10.0], [0.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
START = (20.0, 5.0)
RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
SAVED_POINTS = 300  # points per trajectory kept in the JSON (evenly spaced, ends included)


@dataclass
class Settings:
    budget: int = 3000  # task-gradient evaluations per method
    alpha: float = 0.01  # SGD learning rate of every method (inner lr of the Reptiles)
    inner_steps: int = 100  # K of Reptile and Sequential Reptile
    outer_lr: float = 0.1  # eta (the paper's NLP value)
    gradnorm_alpha: float = 1.5  # GradNorm asymmetry
    gradvac_beta: float = 0.01  # GradVac EMA rate
    recadam_gamma: float = 1.0  # RecAdam: coefficient of the pull toward the start
    recadam_k: float = 0.1  # RecAdam: sigmoid slope
    recadam_t0: int = 250  # RecAdam: sigmoid midpoint (steps)
    recadam_lr: float = 0.1  # RecAdam is Adam-based: SGD's alpha is no fair lr for it
    seed: int = 0  # seed of SeqReptile's task draws and of PCGrad/GradVac orders
    start: tuple[float, float] = START
    methods: list[str] = field(default_factory=list)
    # budgets of the second table: where MTL and the two Reptiles end with more computation
    sweep_budgets: list[int] = field(default_factory=lambda: [1000, 3000, 10000, 30000])


def task_losses(phi: torch.Tensor) -> list[torch.Tensor]:
    """L_i(phi) = -200 exp(-0.2 ||phi - x_i||) for i = 1, 2, 3 (Sec. 4.1)."""
    return [-200.0 * torch.exp(-0.2 * torch.linalg.vector_norm(phi - x)) for x in MINIMA]


def mtl_loss(point: torch.Tensor) -> float:
    return float(sum(task_losses(point)))


def mean_pairwise_cosine(point: torch.Tensor) -> float:
    """Mean over task pairs of cos(grad L_i, grad L_j) at ``point`` (Fig. 3h)."""
    phi = point.detach().clone().requires_grad_(True)
    grads = [torch.autograd.grad(loss, phi)[0] for loss in task_losses(phi)]
    units = [g / g.norm() for g in grads]
    return sum(float(a @ b) for a, b in itertools.combinations(units, 2)) / 3


def new_point(settings: Settings) -> torch.nn.Parameter:
    return torch.nn.Parameter(torch.tensor(settings.start, dtype=torch.float64))


Trajectory = list[list[float]]


def run_multitask(
    make: Callable[[torch.nn.Parameter], object], s: Settings, shift: float = 0.0
) -> Trajectory:
    """A surgery optimizer (``backward(losses)`` then ``step()``): 3 evaluations a step.

    ``shift`` is added to every task loss (same gradients): GradNorm needs positive losses
    because it balances the loss ratios L_i(t) / L_i(0).
    """
    phi = new_point(s)
    opt = make(phi)
    path = [phi.tolist()]
    for _ in range(s.budget // 3):
        opt.zero_grad()  # type: ignore[attr-defined]
        opt.backward([loss + shift for loss in task_losses(phi)])  # type: ignore[attr-defined]
        opt.step()  # type: ignore[attr-defined]
        path.append(phi.tolist())
    return path


def run_recadam(s: Settings) -> Trajectory:
    """RecAdam minimises the MTL loss plus its annealed pull toward the start point."""
    phi = new_point(s)
    opt = RecAdam(
        [phi],
        lr=s.recadam_lr,
        pretrained=[phi.detach().clone()],
        k=s.recadam_k,
        t0=s.recadam_t0,
        gamma=s.recadam_gamma,
    )
    path = [phi.tolist()]
    for _ in range(s.budget // 3):
        opt.zero_grad()
        sum(task_losses(phi)).backward()
        opt.step()
        path.append(phi.tolist())
    return path


def run_stl(s: Settings) -> list[Trajectory]:
    """Single-task learning: plain SGD on each task alone, the whole budget each."""
    paths = []
    for task in range(3):
        phi = new_point(s)
        opt = torch.optim.SGD([phi], lr=s.alpha)
        path = [phi.tolist()]
        for _ in range(s.budget):
            opt.zero_grad()
            task_losses(phi)[task].backward()
            opt.step()
            path.append(phi.tolist())
        paths.append(path)
    return paths


def run_reptile(sequential: bool, s: Settings) -> Trajectory:
    """Slow weights after every outer update (and the start), as Fig. 3 draws them."""
    phi = new_point(s)
    inner = torch.optim.SGD([phi], lr=s.alpha)
    opt: SeqReptile | Reptile
    if sequential:
        opt = SeqReptile(inner, s.inner_steps, s.outer_lr)
    else:
        opt = Reptile(inner, s.inner_steps, s.outer_lr, num_tasks=3)
    generator = torch.Generator().manual_seed(s.seed)
    path = [phi.tolist()]
    for _ in range(s.budget):
        task = int(torch.randint(3, (1,), generator=generator)) if sequential else None
        opt.zero_grad()
        task_losses(phi)[opt.current_task if task is None else task].backward()  # type: ignore[union-attr]
        opt.step()
        if opt.trajectory_step == 0:
            path.append(opt.state[phi]["slow_weight"].tolist())
    opt.outer_step()
    path.append(phi.tolist())
    return path


def methods(s: Settings) -> dict[str, Callable[[], Trajectory | list[Trajectory]]]:
    sgd = lambda phi: torch.optim.SGD([phi], lr=s.alpha)  # noqa: E731
    return {
        "STL": lambda: run_stl(s),
        "MTL": lambda: run_multitask(lambda phi: MTL(sgd(phi)), s),
        "GradNorm": lambda: run_multitask(
            lambda phi: GradNorm(sgd(phi), 3, s.gradnorm_alpha), s, shift=200.0
        ),
        "PCGrad": lambda: run_multitask(lambda phi: PCGrad(sgd(phi), seed=s.seed), s),
        "GradVac": lambda: run_multitask(
            lambda phi: GradVac(sgd(phi), beta=s.gradvac_beta, layers="tensor", seed=s.seed), s
        ),
        "RecAdam": lambda: run_recadam(s),
        "Reptile": lambda: run_reptile(False, s),
        "SeqReptile": lambda: run_reptile(True, s),
    }


def nearest_minimum(point: torch.Tensor) -> tuple[int, float]:
    distances = torch.linalg.vector_norm(MINIMA - point, dim=1)
    index = int(distances.argmin())
    return index + 1, float(distances[index])


def summarise(path: Trajectory) -> dict[str, object]:
    points = torch.tensor(path, dtype=torch.float64)
    final = points[-1]
    minimum, distance = nearest_minimum(final)
    cosines = [mean_pairwise_cosine(p) for p in points]
    return {
        "final_point": [round(v, 4) for v in final.tolist()],
        "final_mtl_loss": mtl_loss(final),
        "nearest_minimum": f"x{minimum}",
        "distance_to_nearest_minimum": distance,
        "in_a_local_minimum": distance < 1.0,
        "mean_cosine_along_trajectory": sum(cosines) / len(cosines),
        "final_cosine": cosines[-1],
    }


def run(s: Settings, progress: bool = True) -> dict[str, object]:
    registry = methods(s)
    chosen = s.methods or list(registry)
    unknown = sorted(set(chosen) - set(registry))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {sorted(registry)}")
    trajectories: dict[str, Trajectory | list[Trajectory]] = {}
    summary: dict[str, object] = {}
    for name in _progress(chosen, progress):
        trajectories[name] = registry[name]()
        if name == "STL":
            summary.update(
                {f"STL (task {t + 1})": summarise(p) for t, p in enumerate(trajectories[name])}  # type: ignore[arg-type]
            )
        else:
            summary[name] = summarise(trajectories[name])  # type: ignore[arg-type]
    sweep: dict[str, dict[str, object]] = {}
    for budget in s.sweep_budgets:
        longer = replace(s, budget=budget)
        for name in ("MTL", "Reptile", "SeqReptile"):
            final = methods(longer)[name]()[-1]
            sweep.setdefault(name, {})[str(budget)] = summarise([final])  # type: ignore[list-item]
    return {
        "settings": asdict(s),
        "machine": {"torch": torch.__version__, "python": platform.python_version()},
        "summary": summary,
        "budget_sweep": sweep,
        "trajectories": trajectories,
    }


def _progress(items: list[str], enabled: bool) -> Iterator[str]:
    try:
        from tqdm import tqdm
    except ImportError:  # the bench extra is optional
        yield from items
        return
    yield from tqdm(items, desc="synthetic experiment", disable=not enabled)


def _thin(trajectories: dict[str, object]) -> dict[str, object]:
    def thin(path: Trajectory) -> Trajectory:
        if len(path) <= SAVED_POINTS:
            return path
        step = (len(path) - 1) / (SAVED_POINTS - 1)
        return [path[round(i * step)] for i in range(SAVED_POINTS)]

    return {
        name: [thin(p) for p in paths] if name == "STL" else thin(paths)  # type: ignore[arg-type,union-attr]
        for name, paths in trajectories.items()
    }


def markdown_table(result: dict[str, object]) -> str:
    lines = [
        f"Budget: {result['settings']['budget']} task-gradient evaluations per method.",  # type: ignore[index]
        "",
        "| method | final point | final MTL loss | nearest minimum (distance) | in a local minimum | mean cosine along trajectory | final cosine |",
        "|---|---|---:|---|---|---:|---:|",
    ]
    for name, r in result["summary"].items():  # type: ignore[attr-defined]
        x, y = r["final_point"]
        lines.append(
            f"| {name} | ({x:.2f}, {y:.2f}) | {r['final_mtl_loss']:.1f} | "
            f"{r['nearest_minimum']} ({r['distance_to_nearest_minimum']:.2f}) | "
            f"{'yes' if r['in_a_local_minimum'] else 'no'} | "
            f"{r['mean_cosine_along_trajectory']:+.3f} | {r['final_cosine']:+.3f} |"
        )
    sweep: dict[str, dict[str, dict[str, object]]] = result["budget_sweep"]  # type: ignore[assignment]
    if sweep:
        budgets = list(next(iter(sweep.values())))
        lines += [
            "",
            "Final point (distance to the nearest minimum; final cosine) against the budget:",
            "",
            "| method | " + " | ".join(budgets) + " |",
            "|---|" + "---|" * len(budgets),
        ]
        for name, by_budget in sweep.items():
            cells = [
                f"({r['final_point'][0]:.1f}, {r['final_point'][1]:.1f}) "  # type: ignore[index]
                f"{r['distance_to_nearest_minimum']:.2f}; {r['final_cosine']:+.2f}"
                for r in by_budget.values()
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, object], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trajectories: dict[str, object] = result["trajectories"]  # type: ignore[assignment]
    names = list(trajectories)
    grid_x, grid_y = torch.meshgrid(
        torch.linspace(-5, 25, 121, dtype=torch.float64),
        torch.linspace(-5, 15, 81, dtype=torch.float64),
        indexing="xy",
    )
    points = torch.stack([grid_x.flatten(), grid_y.flatten()], dim=1)
    surface = torch.stack(
        [sum(-200 * torch.exp(-0.2 * torch.linalg.vector_norm(points - x, dim=1)) for x in MINIMA)]
    ).reshape(grid_x.shape)
    columns = 3
    rows = math.ceil((len(names) + 1) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        ax.contourf(grid_x, grid_y, surface, levels=30, cmap="viridis")
        paths = trajectories[name] if name == "STL" else [trajectories[name]]
        for p in paths:  # type: ignore[union-attr]
            xy = torch.tensor(p)
            ax.plot(xy[:, 0], xy[:, 1], color="white", lw=1.2, marker="." if len(xy) < 60 else None)
            ax.plot(xy[-1, 0], xy[-1, 1], "r*", ms=10)
        ax.plot(MINIMA[:, 0], MINIMA[:, 1], "kx", ms=6)
        ax.set_title(name)
        ax.set_xlim(-5, 25)
        ax.set_ylim(-5, 15)
    heat_ax = axes.flat[len(names)]
    multitask = [n for n in names if n != "STL"]
    bins = 50
    heat = torch.zeros(len(multitask), bins)
    for row, name in enumerate(multitask):
        xy = torch.tensor(trajectories[name], dtype=torch.float64)  # type: ignore[arg-type]
        for b in range(bins):
            heat[row, b] = mean_pairwise_cosine(xy[round(b * (len(xy) - 1) / (bins - 1))])
    image = heat_ax.imshow(heat, aspect="auto", cmap="coolwarm", vmin=-1, vmax=1)
    heat_ax.set_yticks(range(len(multitask)), multitask)
    heat_ax.set_xticks([0, bins - 1], ["start", "end"])
    heat_ax.set_title("mean pairwise task-gradient cosine")
    fig.colorbar(image, ax=heat_ax)
    for ax in list(axes.flat)[len(names) + 1 :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    defaults = Settings()
    for name, value in asdict(defaults).items():
        if name in ("start", "methods", "sweep_budgets"):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--start", type=float, nargs=2, default=list(START))
    parser.add_argument("--methods", nargs="*", default=[])
    parser.add_argument("--sweep-budgets", type=int, nargs="*", default=defaults.sweep_budgets)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--name", default="synthetic", help="file name stem of the outputs")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k in asdict(defaults)}
    values["start"] = tuple(values["start"])
    settings = Settings(**values)
    torch.set_num_threads(1)
    result = run(settings)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {**result, "trajectories": _thin(result["trajectories"])}  # type: ignore[arg-type]
    (args.out / f"{args.name}.json").write_text(json.dumps(saved))
    table = markdown_table(result)
    (args.out / f"{args.name}.md").write_text(table)
    print(table)
    if not args.no_plot:
        plot(result, args.out / f"{args.name}.png")
        print(f"figure: {args.out / f'{args.name}.png'}")
    print(f"table:  {args.out / f'{args.name}.md'} (JSON with trajectories: {args.name}.json)")
    return result


if __name__ == "__main__":
    main()
