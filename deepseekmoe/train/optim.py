"""AdamW with the paper's parameter groups, and the paper's learning-rate schedules.

Parameter groups: weight decay on every matrix (attention and FFN projections, stacked routed
experts, router, embeddings, output head); none on 1-D tensors (RMSNorm gains, biases), whose
decay would pull a gain towards zero rather than regularise a mapping.

`OptimizerList` steps one AdamW per pipeline stage held by a rank as one optimizer.

`ClippedStep` is global-norm clipping and the AdamW update of a step: with a fused AdamW on one
process the clip coefficient is folded into the optimizer's kernel (its `grad_scale` / `found_inf`
inputs) instead of a separate in-place pass over the gradients; otherwise clip_grad_norm_ + step.

`ComputeWeights` keeps bf16 compute copies of the weights autocast would cast at every use, made
once per optimizer step, and accumulates their gradients into fp32 (train/step.py's fast path);
outside a step the parameters are the fp32 masters the optimizer and checkpoints see.

Schedules are pure functions of the optimizer step, so the schedule's whole state in a checkpoint
is the step number and a resumed run follows the same curve bit for bit:

  step       lr = max_lr * min(1, (s + 1) / warmup), then x decay_factor once s reaches each
             fraction of `decay_at` of the total steps (DeepSeekMoE 2B / 16B: x0.316 at 80% and
             again at 90%)
  constant   linear warmup, then max_lr for the rest (DeepSeekMoE 145B)
  cosine     linear warmup, then a half cosine from max_lr down to min_lr_ratio x max_lr at the
             last step (the usual schedule of fine-tuning recipes and of most open pretraining runs)
  wsd        warmup-stable-decay: linear warmup, max_lr flat, then a linear ramp down to
             min_lr_ratio x max_lr over the last `decay_fraction` of the steps (the stable phase can
             be extended and a checkpoint taken before the decay branched off into a shorter run)

Every schedule reaches max_lr at the end of the warmup; cosine and wsd end exactly at
min_lr_ratio x max_lr on the last optimizer step (step total - 1).
"""

from __future__ import annotations

import math

import torch

from deepseekmoe.train.recipe import OptimSection, ScheduleSection


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:  # tied embeddings appear twice
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # A LoRA run trains matrices only: an empty group would break DCP's optimizer state dict.
    return [g for g in groups if g["params"]]


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    impl = cfg.impl
    if impl == "auto":
        impl = "fused" if device.type == "cuda" else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, **kwargs)


class Schedule:
    """lr(step) for optimizer step `step` (0-based) of a run of `total_steps`."""

    def __init__(self, cfg: ScheduleSection, max_lr: float, total_steps: int):
        self.kind = cfg.kind
        self.max_lr = max_lr
        self.warmup = cfg.warmup_steps
        self.total = total_steps
        self.factor = cfg.decay_factor
        # Decay boundaries as step indices: 80% of 100 steps -> steps 80.. use the decayed rate.
        self.boundaries = sorted(math.ceil(f * total_steps) for f in cfg.decay_at)
        self.min_lr = cfg.min_lr_ratio * max_lr
        # wsd: the first step of the decay phase (never inside the warmup).
        self.decay_start = max(self.warmup, total_steps - math.ceil(cfg.decay_fraction * total_steps))

    def __call__(self, step: int) -> float:
        lr = self.max_lr
        if self.warmup > 0 and step < self.warmup:
            return lr * (step + 1) / self.warmup
        if self.kind == "step":
            for b in self.boundaries:
                if step >= b:
                    lr *= self.factor
        elif self.kind == "cosine":
            span = self.total - 1 - self.warmup  # steps from the end of warmup to the last step
            progress = min(1.0, (step - self.warmup) / span) if span > 0 else 1.0
            lr = self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        elif self.kind == "wsd" and step >= self.decay_start:
            n = self.total - self.decay_start  # decay steps; the last one lands on min_lr
            lr = self.max_lr - (self.max_lr - self.min_lr) * min(1.0, (step - self.decay_start + 1) / n)
        return lr

    def set(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        lr = self(step)
        for g in optimizer.param_groups:
            g["lr"] = lr
        return lr


class OptimizerList:
    """Several optimizers stepped as one: a pipeline rank holds one AdamW per stage module, since
    DCP's optimizer state dict pairs each optimizer with the one module whose parameters it owns.
    Offers what the trainer uses (param_groups for the schedule, step, zero_grad)."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers for g in o.param_groups]

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)


def folds_clip(optimizer) -> bool:
    """Whether `optimizer` is one torch Adam / AdamW whose every group runs the fused kernel (the
    ones that read `grad_scale` / `found_inf`, see ClippedStep)."""
    return (isinstance(optimizer, torch.optim.Adam) and getattr(optimizer, "_step_supports_amp_scaling", False)
            and all(g.get("fused") for g in optimizer.param_groups))


class ClippedStep:
    """Global-norm clipping at `max_norm` and the optimizer's update of one step:

        gnorm = cs.clip(loss)      # before the step's host sync
        finite = bool(torch.isfinite(loss + gnorm))
        if finite: cs.update()

    impl "inplace" (the reference twin, and the path of every run before it): clip_fn(params,
    max_norm) (torch.nn.utils.clip_grad_norm_(foreach=True) by default: the norm, then every grad
    multiplied in place by coef = min(1, max_norm / (norm + 1e-6))), and update() runs step().

    impl "fused", taken when folds_clip(optimizer), 0 < max_norm < inf and `fold` (the caller's
    say: False on a distributed run, whose norm is a collective): clip() computes the same norm
    (torch.nn.utils.get_total_norm, foreach, no host sync), then runs step() at once with
        optimizer.grad_scale = max(1, (norm + 1e-6) / max_norm)    so grad / grad_scale = grad * coef (to an ulp)
        optimizer.found_inf  = 1.0 if loss + norm is not finite else 0.0    (fp32 device tensors)
    and removes both attributes after it (GradScaler's contract with `_step_supports_amp_scaling`
    optimizers); update() does nothing. What torch does with them (torch 2.13's torch/optim/adam.py
    _fused_adam; the kernels of aten/src/ATen/native: cuda/fused_adam_utils.cuh FusedAdamMathFunctor,
    cpu/FusedAdamKernel.cpp, read in the PyTorch source; the CPU one checked on 2.13 by the tests):
      - grad_scale: each grad is loaded, divided by *grad_scale in registers (the correctly rounded
        fp32 quotient: CUDA divides in double, CPU in fp32), the update uses the quotient, and the
        quotient is also stored back into .grad (torch keeps .grad unscaled for GradScaler's
        callers: "Conditional Gradient Store" in the CUDA source). So per fp32 parameter
        the step moves 4 bytes more (the grad store) and the separate clip pass (read + write of the
        grad, 8 bytes) is gone: inplace = norm 4 + multiply 8 + AdamW 28 = 40 B; fused = norm 4 +
        AdamW 32 = 36 B, and the multiply's launches are gone. The grad store happens whenever
        grad_scale is set, also when it is 1.
      - found_inf: the step tensors are incremented by a foreach add before the kernel and
        decremented by found_inf after it; the kernel returns before touching any tensor when
        *found_inf == 1 (CUDA: every block; CPU: once, read on the host). A non-finite step thus
        leaves weights, moments, step count and grads as they were; the caller drops the grads.
    Rounding: grad / grad_scale and grad * fl(max_norm / (norm + 1e-6)) can differ by an ulp when
    the clip is active; when it is not (grad_scale 1) the two paths are bit-identical.
    A step whose optimizer has no state yet for some parameter with a gradient (the first) takes
    the inplace path, so a non-finite first step creates no state, as before.
    """

    IMPLS = ("fused", "inplace")

    def __init__(self, optimizer, params, max_norm: float, *, impl: str = "fused", fold: bool = True,
                 clip_fn=None):
        if impl not in self.IMPLS:
            raise ValueError(f"ClippedStep(impl={impl!r}): one of {self.IMPLS}")
        self.optimizer, self.params, self.max_norm = optimizer, list(params), max_norm
        self.clip_fn = clip_fn or (lambda ps, c: torch.nn.utils.clip_grad_norm_(ps, c, foreach=True))
        self.folded = impl == "fused" and fold and folds_clip(optimizer) and 0 < max_norm < math.inf
        self.stepped = False

    def clip(self, loss: torch.Tensor) -> torch.Tensor:
        """The global grad norm before clipping; the folded path has also taken the update."""
        state = self.optimizer.state if self.folded else None
        if state is None or any(p.grad is not None and p not in state for p in self.params):
            self.stepped = False
            return self.clip_fn(self.params, self.max_norm)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        opt = self.optimizer
        opt.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0).float()
        opt.found_inf = (~torch.isfinite(loss.detach() + norm)).float()
        try:
            opt.step()
        finally:
            del opt.grad_scale, opt.found_inf
        self.stepped = True
        return norm

    def update(self) -> None:
        """The update of a finite step (after the host's finiteness check): step() unless clip() took it."""
        if not self.stepped:
            self.optimizer.step()


class ComputeWeights:
    """bf16 compute copies of the matrices for the micro-batches of one optimizer step.

    Under autocast every nn.Linear / expert GEMM casts its fp32 weight at each forward (and again in
    an activation-checkpointed recompute), and its bf16 gradient is cast back and added to the fp32
    grad: passes over every weight per micro-batch. Here `begin()` casts the chosen weights once
    (the parameter's storage is swapped to the bf16 copy, so autocast finds nothing to cast: the
    forward math is the same), a post-accumulate-grad hook adds each micro-batch's bf16 gradient
    into a persistent fp32 buffer (a copy for the step's first micro-batch, an add after: the sum
    the reference forms, in the same order), and `end()` puts the fp32 masters back with the fp32
    sums as their .grad. Clipping, the optimizer and checkpoints see only fp32 tensors.

    Chosen: the weights of nn.Linear modules and the stacked routed experts (what autocast or the
    expert backends cast to the compute dtype). Not: embeddings (the lookup is not autocast: its
    fp32 output starts the fp32 residual stream), a head tied to them, norm gains, the router's
    gate (computed in fp32 by design). One process only (DTensor parameters are refused).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"ComputeWeights(dtype={dtype}): the compute copies are for bf16 / fp16 autocast; "
                             "an fp32 run computes with the masters themselves (LocalStep weights=None)")
        self.dtype = dtype
        self.params = compute_weight_params(model)
        self.low: list[torch.Tensor] = []
        self.grads: list[torch.Tensor | None] = [None] * len(self.params)
        self.masters: list[torch.Tensor] = []
        self.touched = [False] * len(self.params)
        self.active = False
        self.hooks = [p.register_post_accumulate_grad_hook(self._hook(i)) for i, p in enumerate(self.params)]

    def _hook(self, i: int):
        def accumulate(p: torch.Tensor) -> None:
            if not self.active or p.grad is None:
                return
            if self.touched[i]:
                self.grads[i].add_(p.grad)
            else:
                if self.grads[i] is None:
                    self.grads[i] = torch.empty_like(self.masters[i])
                self.grads[i].copy_(p.grad)
                self.touched[i] = True
            p.grad = None
        return accumulate

    def begin(self) -> None:
        """Swap in the compute copies (cast now, once for the step's micro-batches)."""
        if self.active:
            raise RuntimeError("ComputeWeights.begin() twice without end()")
        self.masters = [p.data for p in self.params]
        if not self.low:
            self.low = [torch.empty_like(m, dtype=self.dtype) for m in self.masters]
        for i, (p, low) in enumerate(zip(self.params, self.low)):
            low.copy_(self.masters[i])  # once per optimizer step: a loop of copies costs nothing here
            self.touched[i] = p.grad is not None
            if self.touched[i]:  # a gradient already there (not zeroed): keep accumulating onto it
                self.grads[i] = p.grad
                p.grad = None
            p.data = low
        self.active = True

    def end(self) -> None:
        """Put the fp32 masters back, with this step's fp32 gradient sums as .grad."""
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            p.data = m
            p.grad = self.grads[i] if self.touched[i] else None
        self.masters = []
        self.active = False

    def remove(self) -> None:
        """Drop the hooks and buffers (the model is then as it was built)."""
        if self.active:
            self.end()
        for h in self.hooks:
            h.remove()
        self.hooks, self.low, self.grads = [], [], [None] * len(self.params)


def compute_weight_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable fp32 parameters ComputeWeights keeps in bf16 during a step (see its docstring)."""
    from deepseekmoe.model.moe.layer import RoutedExperts

    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    cfg, head = getattr(model, "config", None), getattr(model, "lm_head", None)
    if getattr(cfg, "lm_loss_chunk", 0) and head is not None:
        # The fused head + loss (model/loss.py) forms its weight gradient in fp32 from the fp32
        # weight; a bf16 copy would round that gradient per micro-batch.
        tied.add(id(head.weight))
    out, seen = [], set()
    for m in model.modules():
        if not isinstance(m, (torch.nn.Linear, RoutedExperts)):
            continue
        for p in m.parameters(recurse=False):
            if not p.requires_grad or p.dtype != torch.float32 or id(p) in tied or id(p) in seen:
                continue
            if type(p) is not torch.nn.Parameter:
                raise ValueError("ComputeWeights runs on one process's plain parameters, not "
                                 f"{type(p).__name__} (FSDP2 has its own MixedPrecisionPolicy)")
            seen.add(id(p))
            out.append(p)
    return out
