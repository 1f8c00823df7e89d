"""A stage's backward in two passes, for zero-bubble schedules (Qi et al., 2023): first the
gradient of its inputs (what the previous stage waits for), later the gradient of its weights
(what nobody waits for, so it fills the pipeline's idle slots).

The autograd graph of one micro-batch is cut where the two meet. Nodes from which a stage
input can be reached form the *input side*; the first pass runs only them (autograd then skips
every weight-gradient product: a matmul's backward computes the weight's product only when the
weight's branch is asked for). Each input-side node with a branch that leads to parameters but
not to an input is a *boundary*: a hook keeps the gradient it received in the first pass, and the
second pass starts from there, running only the parameters' branches. Outputs that do not
depend on any input (the first stage's: its input is data) go wholly to the second pass.

    grads, weights = backward_input(outputs, output_grads, inputs, params)   # send grads upstream
    ...
    weights.backward()                                                       # .grad of params

Boundaries whose branches share a parameter (a weight used twice in a stage) run together, with
a hook that pins each boundary's gradient to the one kept, so that what one of them passes down
the input side to another is not counted twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.autograd.graph import GradientEdge, Node

from plait.parallel import recompute


def _node(t: torch.Tensor) -> Node | None:
    """The node a tensor's gradient enters: its grad_fn, or a leaf's gradient accumulator."""
    if t.grad_fn is not None:
        return t.grad_fn
    if t.requires_grad:
        return t.view_as(t).grad_fn.next_functions[0][0]
    return None


@dataclass
class _Group:
    """Second-pass roots whose branches reach the same parameters: one autograd call."""

    params: set | list = field(default_factory=set)  # parameter accumulator nodes (a list once grouped)
    roots: list = field(default_factory=list)  # (Node, None) boundaries, or (tensor, gradient) outputs


class WeightGradients:
    """What the first pass left for the second: the roots, their gradients, the parameters."""

    def __init__(self, groups: list[_Group], kept: dict, params: dict):
        self._groups, self._kept, self._params = groups, kept, params

    def backward(self, before=None) -> None:
        """Accumulate the parameters' gradients into ``.grad`` (their hooks run as in any backward);
        ``before(params)`` first, for each autograd call (ZeRO-3 gathers what it will read).
        A recomputed block (``train.recompute``) is recomputed once for all the calls."""
        with recompute.shared():
            self._backward(before)
        self._groups, self._kept = [], {}

    def _backward(self, before) -> None:
        for k, group in enumerate(self._groups):
            edges, grads, pins = [], [], []
            for root, grad in group.roots:
                if isinstance(root, torch.Tensor):
                    edges.append(root)
                    grads.append(grad)
                    continue
                kept = self._kept.get(root)
                if kept is None:  # the first pass never reached it (its gradient was zero)
                    continue
                for slot, g in enumerate(kept):
                    if g is not None:
                        edges.append(GradientEdge(root, slot))
                        grads.append(g)
                if len(group.roots) > 1:
                    pins.append(root.register_prehook(lambda _, kept=kept: kept))
            try:
                if edges:
                    params = [self._params[node] for node in group.params]  # in the graph's order
                    if before is not None:
                        before(params)
                    # a later group's call may run nodes this one ran (between pinned boundaries)
                    torch.autograd.backward(edges, grads, retain_graph=k < len(self._groups) - 1, inputs=params)
            finally:
                for pin in pins:
                    pin.remove()


def backward_input(outputs: tuple[torch.Tensor, ...], grads: tuple[torch.Tensor, ...] | None,
                   inputs: tuple[torch.Tensor, ...], params: list[torch.nn.Parameter],
                   ) -> tuple[list[torch.Tensor | None], WeightGradients]:
    """The gradients of ``inputs`` (None where one gets none), and what computes the parameters'."""
    grads = tuple(torch.ones_like(o) for o in outputs) if grads is None else grads
    wanted = [t for t in inputs if t.requires_grad]
    input_nodes = {_node(t) for t in wanted}
    param_of = {_node(p): p for p in params if p.requires_grad}

    # One walk down the graph (iterative: a deep stage's graph is deeper than Python's stack),
    # then, children before parents, which nodes reach an input and which parameters each reaches.
    order, seen = [], set()
    # Every rank of a data-parallel group must run the same autograd calls in the same order (ZeRO
    # gathers and reduces in them): lists and insertion-ordered dicts only, never a set's order.
    stack = [(n, False) for n in dict.fromkeys(_node(o) for o in outputs) if n is not None]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack += [(child, False) for child, _ in node.next_functions if child is not None and child not in seen]
    position = {node: k for k, node in enumerate(order)}
    reaches_input: dict[Node, bool] = {}
    reaches: dict[Node, frozenset] = {}
    for node in order:
        children = [c for c, _ in node.next_functions if c is not None]
        reaches_input[node] = node in input_nodes or any(reaches_input[c] for c in children)
        own = frozenset((node,)) if node in param_of else frozenset()
        reaches[node] = own.union(*(reaches[c] for c in children if not reaches_input[c]))

    # Second-pass roots: boundaries (input side, with a branch to parameters only) and the
    # outputs that reach no input; those sharing a parameter are merged into one group.
    roots = []
    for node in order:
        if reaches_input[node] and node not in input_nodes:
            branch = frozenset().union(*(reaches[c] for c, _ in node.next_functions
                                         if c is not None and not reaches_input[c]))
            if branch:
                roots.append((branch, (node, None)))
    first_pass = [(o, g) for o, g in zip(outputs, grads) if reaches_input.get(_node(o), False)]
    roots += [(reaches[_node(o)], (o, g)) for o, g in zip(outputs, grads)
              if _node(o) is not None and not reaches_input[_node(o)] and reaches[_node(o)]]
    groups: list[_Group] = []
    for branch, root in roots:
        joined = [g for g in groups if g.params & branch]
        group = _Group(set(branch), [root])
        for g in joined:
            group.params |= g.params
            group.roots = g.roots + group.roots
            groups.remove(g)
        groups.append(group)
    for group in groups:
        group.params = sorted(group.params, key=position.__getitem__)

    kept: dict[Node, tuple] = {}
    hooks = [node.register_prehook(lambda g, node=node: kept.__setitem__(node, g))
             for g in groups for node, grad in g.roots if grad is None]
    try:
        found = [None] * len(wanted)
        if first_pass and wanted:
            with recompute.shared():  # what recomputation saved is not kept until the weight pass
                found = list(torch.autograd.grad([o for o, _ in first_pass], wanted, [g for _, g in first_pass],
                                                 retain_graph=True, allow_unused=True))
    finally:
        for hook in hooks:
            hook.remove()
    by_tensor = dict(zip(map(id, wanted), found))
    return [by_tensor.get(id(t)) for t in inputs], WeightGradients(groups, kept, param_of)
