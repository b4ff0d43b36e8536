"""The evaluation metrics of the paper's protocols and their registry.

`METRICS` is the one source of metric names: `midms eval --metrics` takes its choices and help
from it, and each entry names the registered weights it needs, so a missing network is reported
before any work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from midms_cli.errors import MidmsError


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its summary, the weights it needs, whether two folders suffice."""

    name: str
    summary: str
    weights: tuple[str, ...] = ()
    folders: bool = False  # computable from `--real DIR --fake DIR` alone
    oracle: bool = False  # needs the oracle images of the synthetic dataset


METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "fid",
            "Frechet Inception Distance of outputs w/ sources and w/ exemplars (pool3, 2048-d)",
            ("inception-fid",),
            folders=True,
        ),
        MetricSpec(
            "kid",
            "Kernel Inception Distance (unbiased polynomial MMD over subsets), for small sets",
            ("inception-fid",),
            folders=True,
        ),
        MetricSpec(
            "swd", "Sliced Wasserstein Distance x1e3 over a Laplacian pyramid (PGGAN protocol)", folders=True
        ),
        MetricSpec(
            "lpips",
            "LPIPS diversity: mean LPIPS (AlexNet) between outputs of one condition",
            ("alexnet", "lpips-alex"),
        ),
        MetricSpec(
            "style",
            "style relevance (colour relu1_2, texture relu2_2) vs exemplars and semantic "
            "consistency (relu3_2/4_2/5_2) vs sources, VGG19",
            ("vgg19",),
        ),
        MetricSpec(
            "oracle",
            "PSNR and L1 of the output and of the initial warp vs the synthfaces oracle",
            oracle=True,
        ),
    )
}


# The registered weights behind each metric network (a caller may supply the networks instead).
NETWORK_WEIGHTS = {"inception": ("inception-fid",), "lpips": ("alexnet", "lpips-alex"), "vgg": ("vgg19",)}


def missing_weights(name: str, provided: Collection[str] = ()) -> list[str]:
    """The registered weights metric `name` needs that are neither stored nor `provided`."""
    from midms_cli.weights import weight_available

    return [w for w in METRICS[name].weights if w not in provided and not weight_available(w)]


def select_metrics(
    requested: Sequence[str] | None,
    *,
    folders: bool = False,
    has_oracle: bool = True,
    provided: Collection[str] = (),
    report: Callable[[str], None] = print,
) -> list[str]:
    """The metrics to run, in registry order.

    Explicitly requested metrics must be runnable: an unknown name, a missing weight or an
    impossible metric is a MidmsError before any work. By default every applicable metric runs
    and those whose weights are missing are skipped with one line each saying how to add them.
    `provided` names weights whose networks the caller supplies directly.
    """
    if requested:
        unknown = [name for name in requested if name not in METRICS]
        if unknown:
            raise MidmsError(f"unknown metric {unknown[0]!r}; choose from: {', '.join(METRICS)}")
        chosen = [name for name in METRICS if name in requested]
        for name in chosen:
            if folders and not METRICS[name].folders:
                raise MidmsError(
                    f"metric {name!r} needs a model and a dataset, not two folders; "
                    f"folder metrics: {', '.join(n for n, s in METRICS.items() if s.folders)}"
                )
            if METRICS[name].oracle and not has_oracle:
                raise MidmsError(f"metric {name!r} needs oracle images, which only synthfaces shards carry")
            missing = missing_weights(name, provided)
            if missing:
                raise MidmsError(
                    f"metric {name!r} needs the {missing[0]!r} weights; add them with "
                    f"`midms weights add {missing[0]} FILE`"
                )
        return chosen
    chosen = []
    for name, spec in METRICS.items():
        if (folders and not spec.folders) or (spec.oracle and not has_oracle):
            continue
        missing = missing_weights(name, provided)
        if missing:
            report(
                f"skipping {name}: weights {', '.join(missing)} missing; add them with "
                + " and ".join(f"`midms weights add {weight} FILE`" for weight in missing)
            )
            continue
        chosen.append(name)
    return chosen
