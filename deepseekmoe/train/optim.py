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

`TritonAdamW` (optim.impl "triton") is torch's AdamW, state and all, whose step() runs one Triton
kernel per parameter tensor (deepseekmoe/kernels/adamw.py): the clip coefficient and the skip of a
non-finite step read on device, and the compute copies of ComputeWeights written with the update
(its next begin() then casts nothing).

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
import os

import torch

from deepseekmoe.errors import ConfigError
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


def resolve_impl(impl: str, model: torch.nn.Module, device: torch.device) -> str:
    """optim.impl "auto": triton on one CUDA process with plain parameters and triton installed
    (measured on one H200: 20.2 against 25.4 ms for the fused AdamW + folded clip of a 16B-4l step,
    docs/benchmarks.md), fused on other CUDA runs (FSDP2 / expert-parallel DTensors, several ranks),
    foreach on the CPU. Any other value is returned as it is."""
    if impl != "auto":
        return impl
    if device.type != "cuda":
        return torch_adamw_impl(device)
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return torch_adamw_impl(device)
    if any(type(p) not in (torch.nn.Parameter, torch.Tensor) for p in model.parameters()):
        return torch_adamw_impl(device)
    try:
        import deepseekmoe.kernels.adamw  # noqa: F401
    except ImportError:
        return torch_adamw_impl(device)
    return "triton"


def torch_adamw_impl(device: torch.device) -> str:
    """torch's own AdamW kernel for `device` (the reference twin of "triton"): fused on CUDA, foreach elsewhere."""
    return "fused" if device.type == "cuda" else "foreach"


def build_optimizer(model: torch.nn.Module, cfg: OptimSection, device: torch.device) -> torch.optim.AdamW:
    impl = resolve_impl(cfg.impl, model, device)
    if impl == "triton":
        check_triton_adamw(device)
        return TritonAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
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


def step_grads(optimizer, params) -> dict:
    """parameter -> the gradient its update reads: .grad, or the bf16 / fp16 one a ComputeWeights
    with defer_grads left for `optimizer` (a TritonAdamW) in a step of one micro-batch."""
    weights = getattr(optimizer, "compute_weights", None)
    deferred = weights.deferred() if weights is not None else {}
    out = {}
    for p in params:
        g = p.grad if p.grad is not None else deferred.get(p)
        if g is not None:
            out[p] = g
    return out


def total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global 2-norm of `grads` (fp32): torch.nn.utils.get_total_norm(foreach=True) itself when
    every gradient is fp32; bf16 / fp16 gradients' own norms accumulate in fp32 (their _foreach_norm
    in their dtype would round each norm to 8 bits)."""
    if all(g.dtype == torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
    norms = []
    for dtype in dict.fromkeys(g.dtype for g in grads):
        group = [g for g in grads if g.dtype == dtype]
        norms += torch._foreach_norm(group, 2.0, dtype=torch.float32)
    return torch.linalg.vector_norm(torch.stack(norms), 2.0)


def check_triton_adamw(device: torch.device) -> None:
    """ConfigError unless optim.impl "triton" can run on `device`: CUDA with triton installed, or
    Triton's interpreter (TRITON_INTERPRET=1, the CPU tests)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"optim.impl=triton runs its kernel on CUDA GPUs (this run is on {device.type}; the CPU "
                          "runs it only under TRITON_INTERPRET=1, for tests): use optim.impl=auto")
    try:
        import deepseekmoe.kernels.adamw  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"optim.impl=triton needs the triton package ({e}): pip install 'deepseekmoe[gpu]'") from e


class TritonAdamW(torch.optim.AdamW):
    """torch.optim.AdamW whose step() is one Triton kernel per parameter tensor (kernels/adamw.py):

        opt.step(coef=None, found_inf=None, copies=None)

    `coef` (a device scalar) multiplies every gradient in the kernel's registers (the clip; .grad
    is not written), `found_inf` (a device scalar) set to 1 skips the step on device (weights,
    moments and step count as they were), `copies` maps a parameter to a bf16 / fp16 tensor the
    kernel writes with the new weight (default: the compute copies of the attached ComputeWeights,
    see ComputeWeights(optimizer=), which is then told they are fresh). No host sync.

    State and param groups are torch's AdamW(fused=True)'s (state['step'] a float32 tensor on the
    parameter's device, exp_avg, exp_avg_sq): state dicts load into torch.optim.AdamW and back (a
    step kept on the CPU by a foreach AdamW's state is moved to the device at the first step).
    The update is torch's fused AdamW's to the rounding (kernels/adamw.py); a parameter the kernel
    cannot take (not contiguous fp32) gets the same math from its torch twin. No amsgrad, maximize
    or tensor lr. `_step_supports_amp_scaling` is off: a GradScaler unscales the grads itself."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)
        if any(type(p) not in (torch.nn.Parameter, torch.Tensor) for g in self.param_groups for p in g["params"]):
            raise ConfigError("optim.impl=triton updates one process's plain parameters, not DTensors (FSDP2 / "
                              "expert parallel): use optim.impl=auto under torchrun")
        self._step_supports_amp_scaling = False
        self.compute_weights: ComputeWeights | None = None

    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if not state:  # torch's layout and order (Adam._init_group of a fused AdamW)
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        elif state["step"].device != p.device or state["step"].dtype != torch.float32:
            state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
        return state

    @torch.no_grad()
    def step(self, closure=None, *, coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
             copies: dict | None = None):
        from deepseekmoe.kernels.adamw import GRAD_DTYPES, adamw_step_reference, adamw_step_triton

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        weights = self.compute_weights if copies is None else None
        copies = weights.copies() if weights is not None else (copies or {})
        grads = step_grads(self, [p for g in self.param_groups for p in g["params"]])
        work = []
        for group in self.param_groups:
            if group["amsgrad"] or group["maximize"] or isinstance(group["lr"], torch.Tensor):
                raise ValueError("TritonAdamW: no amsgrad, maximize or tensor lr")
            work += [(group, p, self._state(p)) for p in group["params"] if grads.get(p) is not None]
        if not work:
            return loss
        # torch's order: the step counts first (+1, or +0 where found_inf), the update reads them
        torch._foreach_add_([s["step"] for _, _, s in work], 1.0 - found_inf if found_inf is not None else 1.0)
        for group, p, s in work:
            tensors, low = (p, grads[p], s["exp_avg"], s["exp_avg_sq"]), copies.get(p)
            fast = (all(t.dtype == torch.float32 for t in tensors[::2]) and grads[p].dtype in GRAD_DTYPES
                    and all(t.is_contiguous() for t in tensors) and (low is None or low.is_contiguous()))
            (adamw_step_triton if fast else adamw_step_reference)(
                *tensors, s["step"], lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                weight_decay=group["weight_decay"], eps=group["eps"], coef=coef, found_inf=found_inf, low=low)
        if weights is not None:
            weights.mark_fresh([p for _, p, _ in work if p in copies])
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if self.compute_weights is not None:
            self.compute_weights.drop_deferred()


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

    With a TritonAdamW (optim.impl "triton") impl "fused" folds the clip into its kernel instead
    (`mode` "triton"): clip() computes the same norm, then runs step(coef=clamp(max_norm / (norm +
    1e-6), max=1), found_inf=...) at once, the coefficient clip_grad_norm_ multiplies by (so the
    update equals the inplace twin's to the rounding of torch's fused AdamW against the kernel), the
    grads neither multiplied nor stored back. The compute copies are written either way (inplace
    too: the optimizer's own step() writes them).
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
        kernel = isinstance(optimizer, TritonAdamW)
        self.folded = impl == "fused" and fold and (kernel or folds_clip(optimizer)) and 0 < max_norm < math.inf
        self.mode = ("triton" if kernel else "fused") if self.folded else "inplace"
        self.stepped = False

    def clip(self, loss: torch.Tensor) -> torch.Tensor:
        """The global grad norm before clipping; the folded path has also taken the update."""
        state = self.optimizer.state if self.folded else None
        grads = step_grads(self.optimizer, self.params)
        if state is None or any(p not in state for p in grads):
            weights = getattr(self.optimizer, "compute_weights", None)
            if weights is not None:  # clip_grad_norm_ sees .grad only: deferred bf16 gradients become fp32 .grad
                weights.materialize()
            self.stepped = False
            return self.clip_fn(self.params, self.max_norm)
        norm = total_norm(list(grads.values()))  # deferred bf16 gradients only with a TritonAdamW (mode triton)
        opt, found_inf = self.optimizer, (~torch.isfinite(loss.detach() + norm)).float()
        if self.mode == "triton":  # clip_grad_norm_'s coefficient, applied in the kernel
            opt.step(coef=torch.clamp(self.max_norm / (norm + 1e-6), max=1.0), found_inf=found_inf)
        else:
            opt.grad_scale = torch.clamp((norm + 1e-6) / self.max_norm, min=1.0).float()
            opt.found_inf = found_inf
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

    Given a TritonAdamW (`optimizer=`), each of its steps writes the copies with the update and
    `mark_fresh` stamps those parameters with (data_ptr, _version) of their master; begin() casts
    only the copies whose stamp no longer matches (the first step, a parameter without a gradient,
    a master written since: load_state_dict's copy_, a torch optimizer's step; a write through
    `p.data` is not seen) and clears the stamps.
    `casts` counts the tensors begin() has cast.

    `defer_grads` (with a TritonAdamW; ignored with another optimizer, which reads .grad): a step
    of one micro-batch forms no fp32 gradient. The
    hook keeps the bf16 gradient as autograd made it; a second micro-batch turns it into the fp32
    sum as before (copy, then add). end() leaves such a parameter's .grad None and `deferred()`
    gives its bf16 gradient, which ClippedStep's norm (fp32 accumulation) and the optimizer's kernel
    read (upcast in registers: the same values as the fp32 copy). `materialize()` makes them fp32
    .grad (for clip_grad_norm_, torch's optimizers, or any caller reading .grad); the optimizer's
    zero_grad() drops them. Per parameter it saves the copy pass (6 bytes), 4 bytes of norm and
    update reads, and the fp32 gradient buffer (4 bytes of memory).
    """

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16, optimizer=None,
                 defer_grads: bool = False):
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
        self.stamps: dict[int, tuple[int, int]] = {}  # parameter index -> its master's (data_ptr, _version)
        self.casts = 0
        self.defer = defer_grads and isinstance(optimizer, TritonAdamW)  # the one optimizer that reads them
        self.low_grads: list[torch.Tensor | None] = [None] * len(self.params)  # deferred bf16 gradients
        if isinstance(optimizer, TritonAdamW):
            optimizer.compute_weights = self

    def _fp32_grad(self, i: int) -> torch.Tensor:
        if self.grads[i] is None:
            master = self.masters[i] if self.active else self.params[i]
            self.grads[i] = torch.empty_like(master, dtype=torch.float32)
        return self.grads[i]

    def _hook(self, i: int):
        def accumulate(p: torch.Tensor) -> None:
            if not self.active or p.grad is None:
                return
            if self.touched[i]:
                if self.low_grads[i] is not None:  # a second micro-batch: the fp32 sum starts from the first
                    self._fp32_grad(i).copy_(self.low_grads[i])
                    self.low_grads[i] = None
                self.grads[i].add_(p.grad)
            elif self.defer:
                self.low_grads[i] = p.grad
                self.touched[i] = True
            else:
                self._fp32_grad(i).copy_(p.grad)
                self.touched[i] = True
            p.grad = None
        return accumulate

    def begin(self) -> None:
        """Swap in the compute copies (cast now, once for the step's micro-batches)."""
        if self.active:
            raise RuntimeError("ComputeWeights.begin() twice without end()")
        self.materialize()  # deferred gradients not dropped by zero_grad(): accumulate onto them in fp32
        self.masters = [p.data for p in self.params]
        if not self.low:
            self.low = [torch.empty_like(m, dtype=self.dtype) for m in self.masters]
        for i, (p, low) in enumerate(zip(self.params, self.low)):
            if self.stamps.get(i) != (p.data_ptr(), p._version):  # else the optimizer wrote it from this master
                low.copy_(self.masters[i])  # once per optimizer step: a loop of copies costs nothing here
                self.casts += 1
            self.touched[i] = p.grad is not None
            if self.touched[i]:  # a gradient already there (not zeroed): keep accumulating onto it
                self.grads[i] = p.grad
                p.grad = None
            p.data = low
        self.stamps = {}
        self.active = True

    def copies(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """parameter -> its compute copy, for an optimizer step to write (none before the first begin())."""
        if self.active:
            raise RuntimeError("ComputeWeights.copies() inside a step (between begin() and end())")
        return dict(zip(self.params, self.low))

    def mark_fresh(self, params) -> None:
        """The copies of `params` now hold their masters cast (written by the optimizer's step): the
        next begin() skips them unless a master changes before it."""
        index = {id(p): i for i, p in enumerate(self.params)}
        for p in params:
            if id(p) in index:
                self.stamps[index[id(p)]] = (p.data_ptr(), p._version)

    def end(self) -> None:
        """Put the fp32 masters back, with this step's fp32 gradient sums as .grad."""
        for i, (p, m) in enumerate(zip(self.params, self.masters)):
            p.data = m
            p.grad = self.grads[i] if self.touched[i] and self.low_grads[i] is None else None
        self.masters = []
        self.active = False

    def deferred(self) -> dict[torch.nn.Parameter, torch.Tensor]:
        """parameter -> its deferred bf16 gradient (defer_grads, after end(); empty otherwise)."""
        if self.active:
            return {}
        return {p: g for p, g in zip(self.params, self.low_grads) if g is not None}

    def materialize(self) -> None:
        """The deferred bf16 gradients as fp32 .grad (exact), outside a step."""
        if self.active:
            raise RuntimeError("ComputeWeights.materialize() inside a step (between begin() and end())")
        for i, (p, g) in enumerate(zip(self.params, self.low_grads)):
            if g is not None:
                p.grad = self._fp32_grad(i).copy_(g)
                self.low_grads[i] = None

    def drop_deferred(self) -> None:
        """Forget the deferred gradients (the optimizer's zero_grad)."""
        self.low_grads = [None] * len(self.params)

    def remove(self) -> None:
        """Drop the hooks and buffers (the model is then as it was built)."""
        if self.active:
            self.end()
        for h in self.hooks:
            h.remove()
        self.hooks, self.low, self.grads, self.stamps = [], [], [None] * len(self.params), {}
        self.drop_deferred()


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
