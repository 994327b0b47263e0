"""The run's model section, ``[run.model]``: the built-in byte GPT or a ``transformers`` causal LM ("hf").

``ModelConfig`` is part of ``RunConfig`` (node/run_config.py, which re-exports it). With
``family = "hf"`` it names this node's local files by path and carries their content digests,
filled in when it is built (node/model_files.py checks and digests the files); ``shared_dict`` is
what goes into the run hash and the PeerRecord: the digests, never the paths. Like run_config.py,
this module imports neither torch nor transformers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from node.model_files import digest_hf_files

ModelFamily = Literal["zen-gpt", "hf"]  # the built-in byte GPT (node/model.py), or a transformers causal LM
MODEL_PATH_FIELDS = ("hf_config", "tokenizer", "weights")  # a node's own paths: never in the run hash or record
# where the "hf" model's config comes from: a path, or the keys inline; the run hash has its digest instead
MODEL_SOURCE_FIELDS = (*MODEL_PATH_FIELDS, "hf")
MODEL_DIGEST_FIELDS = ("config_digest", "tokenizer_digest", "weights_digest")  # their content: in the hash


def require(ok: bool, message: str) -> None:
    """A config check: raise ``ValueError(message)`` unless ``ok`` (build_section turns it into a ConfigError)."""
    if not ok:
        raise ValueError(message)


def require_choice(value: object, choices: Any, name: str) -> None:
    """A config check: ``value`` is one of the ``Literal`` ``choices``, else a ValueError naming ``name``."""
    allowed = get_args(choices)
    require(value in allowed, f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")


@dataclass
class ModelConfig:
    """The run's model, identical on every peer: the built-in byte GPT, or a ``transformers`` causal LM ("hf").

    With ``family = "hf"`` the model is whatever ``config.json`` describes, built locally (nothing is fetched
    from a hub); its paths are this node's own and stay out of the run hash, which covers the files' content
    digests instead (node/model_files.py), so peers with another base are refused with the field named.
    """

    family: ModelFamily = "zen-gpt"  # "zen-gpt": the byte GPT of the fields below; "hf": the model of hf_config
    vocab_size: int = 256  # byte-level tokens (zen-gpt; an "hf" model's is its config.json's)
    n_layer: int = 2  # transformer blocks (zen-gpt)
    n_head: int = 2  # attention heads per block (zen-gpt)
    d_model: int = 64  # width (zen-gpt)
    context: int = 64  # tokens per training sequence (both families)
    hf_config: str = ""  # hf: local path of the model's config.json, e.g. "./tiny-llama/config.json" (not hashed)
    tokenizer: str = ""  # hf: local path of a tokenizer.json; "" = bytes, token id = byte value (not hashed)
    weights: str = ""  # hf: local folder of *.safetensors base weights; "" = init seeded by train.seed (not hashed)
    # hf: the config.json's keys inline, as the table [run.model.hf] (model_type = "llama", hidden_size = 64, ...),
    # in place of hf_config; the same content as a file gives the same config_digest
    hf: dict[str, Any] = field(default_factory=dict)
    # content digests of the three files (hashed), computed when the config is loaded; one set in the run's
    # file pins that content: a node whose file differs stops with the field named
    config_digest: str = ""
    tokenizer_digest: str = ""
    weights_digest: str = ""

    def __post_init__(self) -> None:
        require_choice(self.family, ModelFamily, "model.family")
        require(8 <= self.context <= 8192, f"model.context must be in [8, 8192], got {self.context}")
        require(
            all(isinstance(getattr(self, name), str) for name in (*MODEL_PATH_FIELDS, *MODEL_DIGEST_FIELDS)),
            "model.hf_config, tokenizer, weights and their digests must be strings",
        )
        require(isinstance(self.hf, dict), "model.hf must be a table of config.json keys, e.g. [run.model.hf]")
        if self.family == "hf":
            self._digest_files()
            return
        require(
            not any(getattr(self, name) for name in (*MODEL_SOURCE_FIELDS, *MODEL_DIGEST_FIELDS)),
            "model.hf_config, hf, tokenizer and weights need model.family = 'hf' (the built-in GPT is byte-level)",
        )
        require(self.vocab_size == 256, f"model.vocab_size must be 256 (bytes), got {self.vocab_size}")
        require(1 <= self.n_layer <= 96, f"model.n_layer must be in [1, 96], got {self.n_layer}")
        require(self.n_head >= 1, f"model.n_head must be >= 1, got {self.n_head}")
        require(
            self.d_model >= 8 and self.d_model % self.n_head == 0,
            f"model.d_model must be >= 8 and divisible by n_head={self.n_head}, got {self.d_model}",
        )

    def _digest_files(self) -> None:
        """Family "hf": check the local files and fill in (or check pinned) content digests."""
        require(
            bool(self.hf_config) != bool(self.hf),
            'model.family = "hf" needs one of model.hf_config (the local path of the model\'s config.json) '
            "or its keys inline as [run.model.hf]" + (", not both" if self.hf_config and self.hf else ""),
        )
        digests = digest_hf_files(self.hf or self.hf_config, self.tokenizer, self.weights, self.context)
        for name, value in (
            ("config_digest", digests.config),
            ("tokenizer_digest", digests.tokenizer),
            ("weights_digest", digests.weights),
        ):
            pinned = getattr(self, name)
            require(
                not pinned or pinned == value,
                f"model.{name} of the run is {pinned} but this node's file gives {value or 'none'}; "
                "use the run's files or drop the pinned digest",
            )
            setattr(self, name, value)

    def shared_dict(self) -> dict[str, Any]:
        """What peers must agree on: no local paths; the built-in GPT without the "hf" fields (its hash as before)."""
        values = dataclasses.asdict(self)
        unshared: tuple[str, ...] = MODEL_SOURCE_FIELDS
        if self.family != "hf":
            unshared = (*MODEL_SOURCE_FIELDS, *MODEL_DIGEST_FIELDS, "family")
        return {key: value for key, value in values.items() if key not in unshared}


MAX_TARGET_MODULES = 64  # most module names in lora.target_modules


@dataclass
class LoraConfig:
    """``[run.lora]``: LoRA adapters (``peft``) on a frozen base; off (full training) while ``r = 0``.

    With adapters, the base's weights are the run's fixed point (``model.weights`` or the seeded init) and
    only the adapters are trained, aggregated, checkpointed and shared with late joiners (node/model_lora.py).
    """

    r: int = 0  # adapter rank; 0 = no adapters, every parameter trains
    alpha: int = 16  # LoRA scaling numerator: the update is (alpha / r) * B @ A
    dropout: float = 0.0  # dropout on the adapters' input while training
    target_modules: list[str] = dataclasses.field(default_factory=list)  # e.g. ["q_proj", "v_proj"]; [] = peft's
    # default for the model type

    def __post_init__(self) -> None:
        require(0 <= self.r <= 1024, f"lora.r must be in [0, 1024] (0 = no adapters), got {self.r}")
        require(
            isinstance(self.alpha, int) and 1 <= self.alpha <= 10_000,
            f"lora.alpha must be an integer in [1, 10000], got {self.alpha!r}",
        )
        require(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        require(
            isinstance(self.target_modules, list)
            and len(self.target_modules) <= MAX_TARGET_MODULES
            and all(isinstance(m, str) and 0 < len(m) <= 128 for m in self.target_modules),
            f"lora.target_modules must be a list of at most {MAX_TARGET_MODULES} module names, e.g. "
            f"['q_proj', 'v_proj'], got {self.target_modules!r}"[:300],
        )

    @property
    def active(self) -> bool:
        return self.r > 0
