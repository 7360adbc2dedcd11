"""wanda-py: the Wanda criterion (Sun et al., 2023) written in Python against Espalier's WIT.

It reimplements the built-in Rust `wanda` plugin (plugins/wanda) and gives the same masks: the
score of weight (i, j) is |W_ij| * sqrt(norm_j), where norm_j is the host's calibration statistic
for input column j; every output row keeps round(density * in) weights, or, with `n` and `m`,
each group of m consecutive inputs of a row keeps its n best (N:M). With `block = [rows, cols]`
whole blocks compete across the layer by the L2 norm of their scores.

Like the Rust plugin it only holds handles: the weights and statistics stay in the host, which
runs the kernels, so Python's speed does not matter here. Build it into a component with
componentize-py (see README, "A criterion in Python").
"""

from componentize_py_types import Err

import wit_world
from wit_world.imports import calibration, kernels, model, progress
from wit_world.imports.plugin_types import (
    Need,
    OutputKind,
    ParamKind,
    ParamProblem,
    ParamSpec,
    ParamValue_Integer,
    ParamValue_Integers,
    PlannedDensity_Fixed,
    PlannedDensity_Unset,
    PluginInfo,
    ProblemAt_Param,
    ProblemAt_Density,
    LayerMask,
    StageOutput,
)

VERSION = "0.1.0"


def _params(pairs):
    return {name: value.value for name, value in pairs}


def _selection(params, columns):
    """What the parameters ask for: ("n-of-m", n, m), ("blocks", rows, cols) or ("per-row",),
    or the list of problems with them."""
    n, m, block = params.get("n", 0), params.get("m", 0), list(params.get("block", []))
    problems = []
    nm = n != 0 or m != 0
    if nm and block:
        return [ParamProblem(ProblemAt_Param("block"), "set either N:M (`n`, `m`) or `block`, not both")]
    if nm:
        if not (0 < n <= m):
            problems.append(ParamProblem(ProblemAt_Param("n"), f"n = {n}, m = {m}: need 0 < n <= m"))
        for name, width in columns:
            if m > 0 and width % m != 0:
                problems.append(ParamProblem(ProblemAt_Param("m"), f"m = {m} does not divide {name}'s {width} inputs"))
                break
        return problems or ("n-of-m", n, m)
    if block:
        if len(block) != 2 or min(block) <= 0:
            return [ParamProblem(ProblemAt_Param("block"), f"block must be [rows, cols] with both > 0, not {block}")]
        return ("blocks", block[0], block[1])
    return ("per-row",)


class WitWorld(wit_world.WitWorld):
    def describe(self) -> PluginInfo:
        return PluginInfo(
            name="wanda-py",
            version=VERSION,
            description="Wanda written in Python (componentize-py): keep the weights with the largest "
            "|w| * sqrt(activation norm) of each output row; N:M with `n` and `m`, or whole blocks "
            "with `block`. Same masks as the built-in Rust `wanda`.",
            params=[
                ParamSpec("n", ParamKind.INTEGER, ParamValue_Integer(0), "N of N:M; 0 = unstructured per-row selection"),
                ParamSpec("m", ParamKind.INTEGER, ParamValue_Integer(0), "M of N:M (0 = unstructured)"),
                ParamSpec("block", ParamKind.INTEGERS, ParamValue_Integers([]), "block shape [rows, cols]; empty = single weights"),
            ],
            needs=[Need.WEIGHTS, Need.ACTIVATIONS],
            produces=OutputKind.MASKS,
        )

    def validate(self, ctx) -> None:
        columns = [(t.name, t.shape[1]) for t in ctx.targets]
        selection = _selection(_params(ctx.params), columns)
        problems = selection if isinstance(selection, list) else []
        unset = isinstance(ctx.density, PlannedDensity_Unset)
        if not problems and selection[0] != "n-of-m" and unset:
            problems.append(ParamProblem(ProblemAt_Density(), "wanda-py needs a density (e.g. density = 0.5)"))
        if not problems and selection[0] == "n-of-m" and isinstance(ctx.density, PlannedDensity_Fixed):
            n, m = selection[1], selection[2]
            if abs(ctx.density.value - n / m) > 1e-9:
                problems.append(ParamProblem(ProblemAt_Density(), f"n = {n}, m = {m} keeps exactly {n / m} of each group; set density = {n / m} or drop it"))
        if problems:
            raise Err(problems)

    def apply(self, ctx) -> StageOutput:
        columns = [(t.layer.name, t.layer.shape[1]) for t in ctx.targets]
        selection = _selection(_params(ctx.params), columns)
        if isinstance(selection, list):
            raise Err("; ".join(p.message for p in selection))
        masks = []
        total = len(ctx.targets)
        for i, target in enumerate(ctx.targets):
            name = target.layer.name
            progress.report(i, total, name)
            with model.weight(name) as w, calibration.activation_norms(name) as norms:
                with kernels.unary(kernels.UnaryOp.SQRT, norms) as scale, kernels.unary(kernels.UnaryOp.ABS, w) as magnitude:
                    # [out, in] * [1, in]: each column scaled by its input's activation norm.
                    scores = kernels.binary(kernels.BinaryOp.MUL, magnitude, scale)
            with scores:
                if selection[0] == "n-of-m":
                    structure = kernels.Structure_NOfM(kernels.NOfM(selection[1], selection[2]))
                    mask = kernels.select(scores, structure, 0.0)
                else:
                    if target.density is None:
                        raise Err(f"layer {name} has no density to prune to")
                    if selection[0] == "blocks":
                        # A block's score is the sum of its elements': squares rank by L2 norm.
                        with kernels.unary(kernels.UnaryOp.SQUARE, scores) as squares:
                            shape = kernels.Structure_Blocks(kernels.BlockShape(selection[1], selection[2]))
                            mask = kernels.select(squares, shape, target.density)
                    else:
                        mask = kernels.select_per_row(scores, target.density)
            masks.append(LayerMask(name, mask))
        progress.report(total, total, "done")
        return StageOutput(masks=masks, budgets=[], heads=[])
