"""Record-level differential privacy: DP-SGD on a node's inner steps, and the accountant of its records.

A *record* is one fixed-length window of the node's training tokens: the training text, tokenized
by the run's tokenizer (node/tokens.py: bytes, token id = byte value, for the built-in GPT and for
an "hf" model without a ``tokenizer.json``; the tokenizer's ids otherwise), is cut into
``N = len(tokens) // (context + 1)`` aligned, non-overlapping windows of ``context + 1`` tokens (a
window gives ``context`` inputs and their next-token targets): exactly the sequences the model
trains on, so the sampling rate ``q = batch / N`` counts what a step samples. Adding, removing or
changing one record changes what leaves the node by at most (epsilon, delta); a token sits in
exactly one record, so the same holds for any single token, and a change of ``k`` consecutive
tokens that keeps the token count touches at most ``ceil(k / (context + 1)) + 1`` records (group
privacy). With the byte tokenizer a token is a byte. With a subword tokenizer an edit of the text
may change the number of tokens and so shift every later window: the guarantee is over the
windows as cut, and text-level group privacy only as good as the windows an edit moves. The tokens
after the last whole window are never trained on.

Each DP-SGD step (Abadi et al. 2016):

1. Poisson sampling: every record joins the batch independently with probability
   ``q = batch_size / N`` (the batch size varies; ``batch_size`` is its expectation). This is
   true Poisson sampling, from a generator seeded by the OS, so the accounting is the standard
   Poisson-subsampled Gaussian with no fixed-size-batch approximation.
2. Per-example gradients of the mean next-token loss of each sampled window, with ``torch.func``
   (``vmap(grad(functional_call(model)))``) over the parameters that train: every parameter of the
   built-in GPT or of an "hf" model, the adapters alone under LoRA (node/model_lora.py turns the
   frozen base into buffers, so no per-example gradient of the base is taken or held). This is
   exact for every model the run can build: the built-in GPT's tied head (``logits = ln_f(x) @
   wte.weight.T``) and unbatched position embedding, an "hf" model's tied ``lm_head``, RMSNorm,
   rotary positions and GPT-2's ``Conv1D`` (tests/test_dpsgd.py, tests/test_dpsgd_hf.py compare
   them with one backward per example). Opacus' ``GradSampleModule`` gets the built-in GPT wrong:
   its hooks give ``wte.weight`` the embedding's part only (they never see the head's use of it)
   and read the unbatched position embedding as a batch of ``context``; its ``functorch`` per-layer
   path fails the same way and its expanded-weights path refuses the unbatched positions (tried
   with Opacus 1.6). It is right for a Llama-shaped "hf" model, but one path serves both families.
   Random layers (LoRA's dropout) draw per example (``randomness="different"``). The examples are
   taken in chunks of at most ``MAX_PER_SAMPLE_FLOATS`` per-example gradient values, handed to
   Opacus as ``grad_sample`` chunk by chunk: its ``DPOptimizer`` clips each chunk and accumulates
   the clipped sum (its virtual steps, ``signal_skip_step``), so a step holds one chunk of
   per-example gradients, not the batch's (an "hf" model of 100M parameters has 400 MB each).
3. Opacus' ``DPOptimizer`` clips each example's whole gradient to L2 norm ``clip_norm`` (flat
   clipping), and once the last chunk is in adds Gaussian noise of std ``sigma * clip_norm`` to the
   sum and divides by the expected batch size; the run's AdamW then steps on that
   (post-processing), at ``lr_scale`` times the learning rate its schedule sets.

Why DP-SGD's batch and learning rate differ from the run's (``privacy.batch_scale``,
``privacy.lr_scale``): the noise on a step's mean gradient is ``sigma * C / B`` per coordinate
(about ``sigma * C * sqrt(d) / B`` in norm, against a clipped mean of norm <= C), and for a fixed
epsilon and number of steps sigma grows more slowly than ``B`` while ``sigma`` is near or below 1
(demo swarm: B = 16 -> sigma 0.56, B = 64 -> 0.90 for 150 steps at epsilon 8), so a bigger
expected batch lowers the noise on every step. AdamW divides each coordinate by the root of its
second moment, which the noise then dominates: the step along the signal shrinks by the
signal-to-noise ratio, and a larger learning rate gives it back. Both were measured on the 4-peer
demo swarm (BENCHMARKS.md, "Differential privacy"); the no-DP baseline is best at the run's own
batch and learning rate, so the scales apply to DP-SGD only.

Accounting: ``s`` steps are ``s`` compositions of the Poisson-subsampled Gaussian mechanism
``(q, sigma)``. The reported epsilon is dp-accounting's PLD accountant; Opacus' PRV and RDP
accountants are the cross-check. Epsilon composes over rounds by counting steps: the steps of
every round add to the one count, whatever the rounds' outcome. The pseudo-gradient a node
sends, and every model derived from it, are post-processing of its DP-SGD steps, so sending it to
a group (or resending it on a retry) costs nothing more; the masked all-reduce still hides each
node's update from the others. The node's noise generator is torch's (not a CSPRNG; Opacus'
``secure_mode`` needs torchcsprng, which we do not ship).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

if TYPE_CHECKING:
    import dp_accounting

VALUE_DISCRETIZATION = 1e-3  # PLD grid: epsilon to about 1e-3
MAX_PER_SAMPLE_FLOATS = 1 << 26  # per-example gradients held at once (256 MB of float32): vmap is chunked past it


class RecordSampler:
    """Poisson samples of a node's records: aligned windows of ``context + 1`` of its training tokens.

    Args:
        tokens: the node's training token ids (1-D; node/tokens.py), or its training bytes (the byte tokenizer).
        context: tokens per window's inputs (a record is ``context + 1`` tokens).
        expected_batch: the mean number of records per sample; the sampling rate is ``expected_batch / N``.
        seed: seeds the sampling (None: from the OS, so nobody can predict which records a step uses).
    """

    def __init__(self, tokens: torch.Tensor | bytes, context: int, expected_batch: int, seed: int | None = None):
        width = context + 1
        count = len(tokens) // width
        if count < 1:
            raise ValueError(f"the data has {len(tokens)} tokens: less than one record of {width} tokens")
        if isinstance(tokens, bytes):
            tokens = torch.frombuffer(bytearray(tokens[: count * width]), dtype=torch.uint8)
        self.records = tokens[: count * width].reshape(count, width).long()
        self.sample_rate = min(1.0, expected_batch / count)
        self.generator = torch.Generator().manual_seed(
            int.from_bytes(os.urandom(8), "little") if seed is None else seed
        )

    @property
    def count(self) -> int:
        """N: the records this node trains on."""
        return int(self.records.shape[0])

    def sample(self) -> tuple[torch.Tensor, torch.Tensor]:
        """One Poisson sample: every record in with probability ``sample_rate``; (inputs, targets)."""
        chosen = torch.rand(self.count, generator=self.generator) < self.sample_rate
        windows = self.records[chosen]
        return windows[:, :-1], windows[:, 1:]


class DPSGDStep:
    """One DP-SGD step of ``model`` on a Poisson sample: per-example gradients, Opacus' clip and noise, AdamW.

    Args:
        model: the local model (its forward takes tokens and targets and returns the mean loss); its parameters
            that require a gradient are those trained (under LoRA, the adapters).
        optimizer: the run's inner optimizer over those parameters; wrapped (not replaced) by Opacus'
            ``DPOptimizer``, so its ``param_groups`` (the learning-rate schedule) and state (checkpoints) stay the
            trainer's.
        sampler: the node's records.
        noise_multiplier: sigma of each step's Gaussian noise, in units of ``clip_norm``.
        clip_norm: C, the L2 bound on each example's gradient.
        device: where the model lives.
        lr_scale: each step runs at this times the learning rate of ``optimizer``'s param groups.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        sampler: RecordSampler,
        noise_multiplier: float,
        clip_norm: float,
        device: torch.device,
        lr_scale: float = 1.0,
    ):
        from opacus.optimizers import DPOptimizer

        self.model, self.sampler, self.device = model, sampler, device
        self.noise_multiplier, self.clip_norm, self.lr_scale = noise_multiplier, clip_norm, lr_scale
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=clip_norm,
            expected_batch_size=max(1, round(sampler.sample_rate * sampler.count)),
            loss_reduction="mean",
        )
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        size = sum(p.numel() for p in self.params.values())
        self.chunk = max(1, MAX_PER_SAMPLE_FLOATS // max(1, size))  # examples whose gradients are held at once
        self._per_example: Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]] = vmap(
            grad_and_value(self._example_loss), in_dims=(None, 0, 0), randomness="different"
        )

    def _example_loss(
        self, params: dict[str, torch.Tensor], tokens: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        return functional_call(self.model, params, (tokens[None], targets[None]))

    def per_example_gradients(
        self, tokens: torch.Tensor, targets: torch.Tensor
    ) -> tuple[dict[str, torch.Tensor], float]:
        """Each example's gradient (name -> [batch, *shape]) and the batch's mean loss (NaN if empty).

        All examples at once: ``step_on`` calls it on chunks of at most ``chunk`` examples.
        """
        if tokens.shape[0] == 0:  # an empty Poisson sample: no gradient, the noise is still added
            return {name: torch.zeros(1, *p.shape, device=p.device) for name, p in self.params.items()}, math.nan
        detached = {name: p.detach() for name, p in self.params.items()}
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no vmap rule (a slow per-example loop)
            grads, losses = self._per_example(detached, tokens.to(self.device), targets.to(self.device))
        return grads, float(losses.mean())

    def slices(self, count: int) -> list[slice]:
        """The chunks ``step_on`` cuts a batch of ``count`` examples into (one, empty, for an empty batch)."""
        return [slice(start, start + self.chunk) for start in range(0, max(1, count), self.chunk)]

    def step_on(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """Clip, noise and apply the gradients of this batch; returns its mean loss.

        The batch goes through in chunks: Opacus clips each chunk's examples into the parameters' ``summed_grad``
        (a skipped step), and the last chunk's step adds the noise once and steps the optimizer.
        """
        parts = self.slices(tokens.shape[0])
        total = 0.0
        groups = self.optimizer.param_groups  # the trainer's: its schedule set their lr for this step
        rates = [group["lr"] for group in groups]
        try:
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate * self.lr_scale
            for part in parts:
                grads, loss = self.per_example_gradients(tokens[part], targets[part])
                total += loss * tokens[part].shape[0]
                for name, param in self.params.items():
                    param.grad_sample = grads[name]  # type: ignore[attr-defined]  # read by Opacus' DPOptimizer
                self.optimizer.signal_skip_step(part is not parts[-1])  # all but the last chunk: clip and accumulate
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)  # after a skipped step it keeps the clipped sum
        finally:
            for group, rate in zip(groups, rates, strict=True):
                group["lr"] = rate
        return total / tokens.shape[0] if tokens.shape[0] else math.nan

    def __call__(self) -> float:
        """One step on a fresh Poisson sample of the records; returns its mean loss."""
        return self.step_on(*self.sampler.sample())


# dp-accounting is imported where it is used: it costs 0.6 s at start-up, and only DP runs need it.


def sampled_gaussian_steps(noise_multiplier: float, sample_rate: float, steps: int) -> dp_accounting.DpEvent:
    """``steps`` DP-SGD steps: the Poisson-subsampled Gaussian mechanism, self-composed."""
    import dp_accounting

    step = dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))
    return dp_accounting.SelfComposedDpEvent(step, steps)


def record_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Epsilon of ``steps`` DP-SGD steps (dp-accounting PLD): the reported figure."""
    if steps == 0:
        return 0.0
    from dp_accounting.pld import pld_privacy_accountant

    accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION)
    accountant.compose(sampled_gaussian_steps(noise_multiplier, sample_rate, steps))
    return float(accountant.get_epsilon(delta))


def opacus_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: str = "prv") -> float:
    """The same from Opacus' accountant (``"prv"`` or ``"rdp"``): the cross-check."""
    if steps == 0:
        return 0.0
    from opacus.accountants import PRVAccountant, RDPAccountant

    accountant = PRVAccountant() if kind == "prv" else RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


def calibrate_record_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest sigma whose ``steps`` DP-SGD steps at ``sample_rate`` stay within ``target_epsilon`` (PLD)."""
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    return float(
        dp_accounting.calibrate_dp_mechanism(
            lambda: pld_privacy_accountant.PLDAccountant(value_discretization_interval=VALUE_DISCRETIZATION),
            lambda s: sampled_gaussian_steps(s, sample_rate, steps),
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.ExplicitBracketInterval(0.3, 500.0),  # below 0.3 the PLD grid explodes
        )
    )


class RecordAccountant:
    """One node's record-level budget: the DP-SGD steps it took, epsilon spent, and the steps still allowed.

    Args:
        noise_multiplier: sigma of every step.
        sample_rate: q of every step's Poisson sample.
        delta: the delta of every reported epsilon.
        budget: the epsilon the node may spend; ``math.inf`` for no limit.
        steps: steps already taken (restored from a checkpoint).
    """

    def __init__(self, noise_multiplier: float, sample_rate: float, delta: float, budget: float, steps: int = 0):
        if noise_multiplier <= 0 or not 0 < sample_rate <= 1:
            raise ValueError("DP-SGD needs a noise multiplier > 0 and a sample rate in (0, 1]")
        self.noise_multiplier, self.sample_rate, self.delta = noise_multiplier, sample_rate, delta
        self.budget, self.steps = budget, steps
        self._cache: dict[int, float] = {}
        self._max_steps: int | None = None

    def epsilon(self, steps: int | None = None) -> float:
        """Epsilon (PLD) after ``steps`` steps (default: those taken so far)."""
        steps = self.steps if steps is None else steps
        if steps not in self._cache:
            self._cache[steps] = record_epsilon(self.noise_multiplier, self.sample_rate, steps, self.delta)
        return self._cache[steps]

    def cross_check(self, kind: str = "prv") -> float:
        """Opacus' epsilon for the steps taken (``"prv"`` or ``"rdp"``)."""
        return opacus_epsilon(self.noise_multiplier, self.sample_rate, self.steps, self.delta, kind)

    def max_steps(self) -> int | None:
        """The most steps whose epsilon stays within the budget (None: no budget)."""
        if math.isinf(self.budget):
            return None
        if self._max_steps is None:
            low, high = 0, 1
            while self.epsilon(high) <= self.budget and high < 1 << 24:
                low, high = high, high * 2
            while high - low > 1:  # epsilon(low) <= budget < epsilon(high)
                middle = (low + high) // 2
                low, high = (middle, high) if self.epsilon(middle) <= self.budget else (low, middle)
            self._max_steps = low
        return self._max_steps

    def steps_left(self) -> int | None:
        """Steps the budget still allows (None: no budget)."""
        most = self.max_steps()
        return None if most is None else max(0, most - self.steps)

    def record(self, steps: int) -> None:
        """Count ``steps`` DP-SGD steps taken."""
        self.steps += steps
