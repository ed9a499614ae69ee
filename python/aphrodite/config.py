"""Model configuration: what a LLaVA checkpoint folder says, read without HF model classes.

`ModelConfig.load` resolves a local folder or a hub id (through the local HF cache, then a
download where a network exists), parses `config.json` (LlavaConfig: a Llama text config and a
CLIP vision config, in either the transformers-4 or the transformers-5 layout, with the same
defaults transformers applies to keys a checkpoint leaves out), the image processor settings,
the tokenizer and its chat template, and picks the dtype and device.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Files the runtime needs from a hub snapshot (weights as safetensors only).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]

SUPPORTED_ROPE_TYPES = ("default", "dynamic", "linear", "llama3")
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")
# transformers' names for the projector activation -> the projector op's names.
PROJECTOR_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
}


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding settings: `rope_type` in SUPPORTED_ROPE_TYPES."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class TextConfig:
    """The Llama decoder (LlamaConfig fields, with transformers' defaults); a Mistral decoder is
    the same with a sliding attention window."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = field(default_factory=RopeConfig)
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    model_type: str = "llama"
    # Mistral: a token attends to the keys of the last `sliding_window` positions (its own
    # included); 0: no window.
    sliding_window: int = 0


# transformers' defaults where MistralConfig's differ from LlamaConfig's.
_MISTRAL_DEFAULTS = {
    "intermediate_size": 14336,
    "num_key_value_heads": 8,
    "max_position_embeddings": 4096 * 32,
    "sliding_window": 4096,
}


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP vision tower (CLIPVisionConfig fields, with LlavaConfig's defaults)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class LlavaConfig:
    """The parts of a LLaVA `config.json` the runtime uses."""

    text: TextConfig
    vision: VisionConfig
    image_token_index: int = 32000
    projector_hidden_act: str = "gelu"
    vision_feature_select_strategy: str = "default"
    # Indices into CLIP's hidden states (0 = embeddings, i = output of layer i; negative counts
    # from the end), as in HF. Several layers are concatenated along the feature dimension.
    vision_feature_layers: tuple[int, ...] = (-2,)
    multimodal_projector_bias: bool = True
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None

    @property
    def num_image_tokens(self) -> int:
        return self.vision.num_patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def vision_layers_needed(self) -> int:
        """How many CLIP encoder layers must run to produce every selected hidden state."""
        return max(self.resolved_feature_layers())

    def resolved_feature_layers(self) -> list[int]:
        n = self.vision.num_hidden_layers
        return [layer + n + 1 if layer < 0 else layer for layer in self.vision_feature_layers]


def _get(d: dict[str, Any], key: str, default: Any) -> Any:
    value = d.get(key)
    return default if value is None else value


def _parse_rope(text: dict[str, Any], max_position_embeddings: int) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); transformers 4 wrote `rope_theta`
    # and an optional `rope_scaling` dict whose type key was `type` in older checkpoints.
    params = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(_get(params, "rope_theta", _get(text, "rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"rope type {rope_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    if float(_get(params, "partial_rotary_factor", _get(text, "partial_rotary_factor", 1.0))) != 1:
        raise ValueError("partial_rotary_factor != 1 is not supported for Llama")
    factor = float(_get(params, "factor", 1.0))
    if rope_type in ("default", "dynamic"):
        # Dynamic NTK (transformers) changes the frequencies only for sequences longer than
        # max_position_embeddings, which max_model_len never exceeds: the default ones.
        return RopeConfig(theta=theta)
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=factor,
        low_freq_factor=float(params["low_freq_factor"]),
        high_freq_factor=float(params["high_freq_factor"]),
        original_max_position_embeddings=int(
            _get(params, "original_max_position_embeddings", max_position_embeddings)
        ),
    )


def parse_llava_config(cfg: dict[str, Any]) -> LlavaConfig:
    """Parses a LLaVA config.json dict, applying transformers' defaults for missing keys."""
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llava" and "LlavaForConditionalGeneration" not in archs:
        raise ValueError(
            f"not a LLaVA checkpoint: model_type={cfg.get('model_type')!r}, architectures={archs}"
        )
    text = dict(cfg.get("text_config") or {})
    text_type = text.get("model_type", "llama")
    if text_type not in ("llama", "mistral"):
        raise ValueError(f"text model {text_type!r} is not supported (only 'llama' and 'mistral')")
    if text_type == "mistral":
        # A key written as null means "none" (sliding_window: null is no window), so only
        # missing keys take Mistral's defaults.
        text = {**{k: v for k, v in _MISTRAL_DEFAULTS.items() if k not in text}, **text}
        # Mistral's attention and MLP have no biases whatever the config says.
        text["attention_bias"] = text["mlp_bias"] = False
        window = text["sliding_window"]
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"Mistral sliding_window must be null or at least 1, got {window!r}")
        # HF's Mistral applies one window to every layer; a config that mixes full and sliding
        # layers (Ministral's layout) would be computed wrongly, so it is refused.
        kinds = set(text.get("layer_types") or [])
        wanted = {"sliding_attention"} if window is not None else {"full_attention"}
        if kinds and kinds != wanted:
            raise ValueError(
                f"layer_types {sorted(kinds)} with sliding_window={window!r} is not supported "
                "(one window for every layer, as HF's Mistral applies it; mixed layers are "
                "Ministral's layout)"
            )
    vision = dict(cfg.get("vision_config") or {})
    if vision.get("model_type", "clip_vision_model") != "clip_vision_model":
        raise ValueError(
            f"vision model {vision['model_type']!r} is not supported (only 'clip_vision_model')"
        )

    hidden = int(_get(text, "hidden_size", 4096))
    heads = int(_get(text, "num_attention_heads", 32))
    max_pos = int(_get(text, "max_position_embeddings", 2048))
    hidden_act = _get(text, "hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"Llama hidden_act {hidden_act!r} is not supported (only 'silu')")
    # (pretraining_tp, which some Llama 2 exports carry, changes nothing in inference: ignored as
    # transformers 5 ignores it.)
    text_config = TextConfig(
        vocab_size=int(_get(text, "vocab_size", 32000)),
        hidden_size=hidden,
        intermediate_size=int(_get(text, "intermediate_size", 11008)),
        num_hidden_layers=int(_get(text, "num_hidden_layers", 32)),
        num_attention_heads=heads,
        num_key_value_heads=int(_get(text, "num_key_value_heads", heads)),
        head_dim=int(_get(text, "head_dim", hidden // heads)),
        hidden_act=hidden_act,
        max_position_embeddings=max_pos,
        rms_norm_eps=float(_get(text, "rms_norm_eps", 1e-6)),
        rope=_parse_rope(text, max_pos),
        attention_bias=bool(_get(text, "attention_bias", False)),
        mlp_bias=bool(_get(text, "mlp_bias", False)),
        bos_token_id=text.get("bos_token_id", 1),
        eos_token_id=text.get("eos_token_id", 2),
        model_type=text_type,
        sliding_window=int(text.get("sliding_window") or 0) if text_type == "mistral" else 0,
    )
    if text_config.num_attention_heads % text_config.num_key_value_heads:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if text_config.head_dim <= 0 or text_config.head_dim % 8:
        raise ValueError(
            f"head_dim {text_config.head_dim} is not supported: the attention kernels take "
            "multiples of 8 (64, 80, 96, 112, 128 and 256 on CUDA)"
        )

    vision_act = _get(vision, "hidden_act", "quick_gelu")
    if vision_act not in VISION_ACTIVATIONS:
        raise ValueError(f"CLIP hidden_act {vision_act!r} is not supported ({VISION_ACTIVATIONS})")
    vision_config = VisionConfig(
        hidden_size=int(_get(vision, "hidden_size", 1024)),
        intermediate_size=int(_get(vision, "intermediate_size", 4096)),
        num_hidden_layers=int(_get(vision, "num_hidden_layers", 24)),
        num_attention_heads=int(_get(vision, "num_attention_heads", 16)),
        image_size=int(_get(vision, "image_size", 336)),
        patch_size=int(_get(vision, "patch_size", 14)),
        num_channels=int(_get(vision, "num_channels", 3)),
        hidden_act=vision_act,
        layer_norm_eps=float(_get(vision, "layer_norm_eps", 1e-5)),
    )
    if vision_config.num_channels != 3:
        raise ValueError("only 3-channel (RGB) vision towers are supported")

    strategy = _get(cfg, "vision_feature_select_strategy", "default")
    if strategy not in ("default", "full"):
        raise ValueError(f"vision_feature_select_strategy {strategy!r} is not 'default' or 'full'")
    layers = _get(cfg, "vision_feature_layer", -2)
    layers = (int(layers),) if isinstance(layers, int) else tuple(int(x) for x in layers)
    act = _get(cfg, "projector_hidden_act", "gelu")
    if act not in PROJECTOR_ACTIVATIONS:
        raise ValueError(
            f"projector_hidden_act {act!r} is not supported ({sorted(PROJECTOR_ACTIVATIONS)})"
        )
    # HF forwards the text config's tie flag when the top-level one is false.
    tie = bool(_get(cfg, "tie_word_embeddings", False)) or bool(
        _get(text, "tie_word_embeddings", False)
    )
    config = LlavaConfig(
        text=text_config,
        vision=vision_config,
        image_token_index=int(_get(cfg, "image_token_index", _get(cfg, "image_token_id", 32000))),
        projector_hidden_act=act,
        vision_feature_select_strategy=strategy,
        vision_feature_layers=layers,
        multimodal_projector_bias=bool(_get(cfg, "multimodal_projector_bias", True)),
        tie_word_embeddings=tie,
        torch_dtype=cfg.get("dtype") or cfg.get("torch_dtype") or text.get("torch_dtype"),
    )
    for layer in config.resolved_feature_layers():
        if not 0 <= layer <= vision_config.num_hidden_layers:
            raise ValueError(
                f"vision_feature_layer {layers} is out of range for "
                f"{vision_config.num_hidden_layers} CLIP layers"
            )
    return config


def parse_image_processor(pp: dict[str, Any]) -> dict[str, Any]:
    """CLIP image-processor settings (preprocessor_config.json) as the preprocessing op takes them.

    Older configs write `size`/`crop_size` as plain ints; `do_rescale`/`do_normalize` false are
    folded into rescale_factor 1 and mean 0 / std 1.
    """
    size = pp.get("size", {"shortest_edge": 224})
    if isinstance(size, dict):
        if "shortest_edge" not in size:
            raise ValueError(f"image processor size {size} is not a shortest_edge size")
        shortest_edge = int(size["shortest_edge"])
    else:
        shortest_edge = int(size)
    crop = pp.get("crop_size", {"height": 224, "width": 224})
    crop_size = (
        (int(crop["height"]), int(crop["width"]))
        if isinstance(crop, dict)
        else (
            int(crop),
            int(crop),
        )
    )
    do_normalize = bool(pp.get("do_normalize", True))
    resample = int(pp.get("resample", 3))
    if resample != 3:
        raise ValueError(f"image resample mode {resample} is not supported (only 3, bicubic)")
    return {
        "shortest_edge": shortest_edge,
        "crop_size": crop_size,
        "mean": [float(x) for x in pp.get("image_mean", [0.48145466, 0.4578275, 0.40821073])]
        if do_normalize
        else [0.0, 0.0, 0.0],
        "std": [float(x) for x in pp.get("image_std", [0.26862954, 0.26130258, 0.27577711])]
        if do_normalize
        else [1.0, 1.0, 1.0],
        "rescale_factor": float(pp.get("rescale_factor", 1 / 255))
        if pp.get("do_rescale", True)
        else 1.0,
        "do_resize": bool(pp.get("do_resize", True)),
        "do_center_crop": bool(pp.get("do_center_crop", True)),
        "do_convert_rgb": bool(pp.get("do_convert_rgb", True)),
    }


def resolve_model_path(
    model: str | os.PathLike, revision: str | None = None, what: str = "model"
) -> Path:
    """A local folder as is; otherwise a hub id through the HF cache, then a download attempt.
    ``what`` names the argument in errors ("model", "tokenizer")."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    model = str(model)
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ValueError(f"{what} path {model!r} is not a folder")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise ValueError(
            f"{what} {model!r} is not a local folder and huggingface_hub is missing"
        ) from e
    try:
        return Path(
            snapshot_download(
                model, revision=revision, allow_patterns=_HUB_PATTERNS, local_files_only=True
            )
        )
    except Exception as cached_error:  # not cached (or partially): try the network
        try:
            return Path(snapshot_download(model, revision=revision, allow_patterns=_HUB_PATTERNS))
        except Exception as download_error:
            raise ValueError(
                f"{what} {model!r} is not a local folder, is not in the Hugging Face cache "
                f"({HF_HUB_CACHE}) and could not be downloaded "
                f"({type(download_error).__name__}: {download_error}). Download it where a "
                f"network exists (huggingface-cli download {model}) or pass a local folder."
            ) from cached_error


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        device = str(device)
    if device == "auto":
        from aphrodite import _C

        usable = _C.cuda_compiled() and torch.cuda.is_available()
        return torch.device("cuda" if usable else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}") from e
    if dev.type == "cuda":
        from aphrodite import _C

        if not _C.cuda_compiled():
            raise ValueError("device='cuda' but aphrodite was built without CUDA")
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no CUDA device")
    elif dev.type != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', not {device!r}")
    return dev


def resolve_dtype(dtype: str | torch.dtype, checkpoint_dtype: str | None, device: torch.device):
    """`auto` takes the checkpoint's dtype (float32 when it names none), except that on the CPU
    a float16 checkpoint runs in bfloat16 (torch's CPU GEMMs favour it) and on CUDA a float32
    one runs in bfloat16 (the CUDA attention and GEMM kernels are 16-bit only)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype {dtype} is not one of float32, float16, bfloat16")
        resolved = dtype
    elif dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(
                f"dtype must be 'auto', 'float32', 'float16' or 'bfloat16', not {dtype!r}"
            )
        resolved = _DTYPES[dtype]
    else:
        resolved = _DTYPES.get(str(checkpoint_dtype).replace("torch.", ""), torch.float32)
        if resolved == torch.float16 and device.type == "cpu":
            return torch.bfloat16
        if resolved == torch.float32 and device.type == "cuda":
            return torch.bfloat16
    if resolved == torch.float32 and device.type == "cuda":
        raise ValueError("float32 is not supported on CUDA (the kernels are float16/bfloat16)")
    return resolved


def _load_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _find_chat_template(folder: Path, tokenizer: Any) -> str | None:
    """The processor's template first, then the tokenizer's: the order of HF's LlavaProcessor
    and of vLLM for multimodal models (some llava-hf repos keep a text-only template in
    tokenizer_config.json). Like transformers 5's processor, the legacy chat_template.json wins
    over chat_template.jinja."""
    data = _load_json(folder / "chat_template.json")
    if data and data.get("chat_template"):
        return data["chat_template"]
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    if isinstance(template, str) and template:
        return template
    return None


# Head sizes of the CUDA attention kernels (cpp/src/attention/attention.cpp checks the same).
CUDA_HEAD_SIZES = (64, 80, 96, 112, 128, 256)


@dataclass
class ModelConfig:
    """Everything the runner and the engine need to know about a model (see RUNTIME_API.md)."""

    model: Path
    hf_config: LlavaConfig
    dtype: torch.dtype
    device: torch.device
    max_model_len: int
    image_processor: dict[str, Any]
    tokenizer: Any
    chat_template: str | None
    eos_token_id: int | None  # the primary end-of-sequence id
    tokenizer_path: Path | None = None
    # Every id that ends a sequence, the primary one first (_eos_token_ids).
    eos_token_ids: tuple[int, ...] = ()
    # The sampling defaults of the checkpoint's generation_config.json, as SamplingParams
    # keywords (_generation_defaults): what a request that does not set them gets.
    generation_defaults: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(
        cls,
        model: str | os.PathLike,
        tokenizer: str | os.PathLike | None = None,
        dtype: str | torch.dtype = "auto",
        device: str | torch.device = "auto",
        max_model_len: int | None = None,
        revision: str | None = None,
        tokenizer_revision: str | None = None,
        load_tokenizer: bool = True,
    ) -> ModelConfig:
        folder = resolve_model_path(model, revision)
        raw = _load_json(folder / "config.json")
        if raw is None:
            raise ValueError(f"{folder} has no config.json")
        hf_config = parse_llava_config(raw)
        dev = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, hf_config.torch_dtype, dev)
        if dev.type == "cuda" and hf_config.text.head_dim not in CUDA_HEAD_SIZES:
            raise ValueError(
                f"head_dim {hf_config.text.head_dim} is not supported on CUDA (the attention "
                f"kernels take {', '.join(map(str, CUDA_HEAD_SIZES))})"
            )

        limit = hf_config.text.max_position_embeddings
        if max_model_len is None:
            max_model_len = limit
        elif not 0 < max_model_len <= limit:
            raise ValueError(
                f"max_model_len {max_model_len} must be in [1, {limit}] "
                "(the model's max_position_embeddings)"
            )

        pp = _load_json(folder / "preprocessor_config.json")
        if pp is None:
            raise ValueError(f"{folder} has no preprocessor_config.json (the image processor)")
        image_processor = parse_image_processor(pp)

        tok = None
        tok_folder = None
        if load_tokenizer:
            tok_folder = (
                folder
                if tokenizer is None
                else resolve_model_path(tokenizer, tokenizer_revision, what="tokenizer")
            )
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok_folder))
        chat_template = _find_chat_template(folder, tok) if tok is not None else None
        if chat_template is None and tok_folder is not None and tok_folder != folder:
            chat_template = _find_chat_template(tok_folder, None)

        generation_config = _load_json(folder / "generation_config.json") or {}
        eos = _eos_token_ids(generation_config, hf_config, tok)
        return cls(
            model=folder,
            hf_config=hf_config,
            dtype=torch_dtype,
            device=dev,
            max_model_len=max_model_len,
            image_processor=image_processor,
            tokenizer=tok,
            chat_template=chat_template,
            eos_token_id=eos[0] if eos else None,
            eos_token_ids=eos,
            tokenizer_path=tok_folder,
            generation_defaults=_generation_defaults(generation_config, folder),
        )

    # Flat views of the parsed config (the names RUNTIME_API.md promises).
    @property
    def vocab_size(self) -> int:
        return self.hf_config.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.hf_config.text.hidden_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.text.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.text.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return self.hf_config.text.num_key_value_heads

    @property
    def head_dim(self) -> int:
        return self.hf_config.text.head_dim

    @property
    def image_token_id(self) -> int:
        return self.hf_config.image_token_index

    @property
    def num_image_tokens(self) -> int:
        return self.hf_config.num_image_tokens

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ValueError unless the image preprocessing can take an image of this size."""
        from aphrodite.ops import check_image_size

        p = self.image_processor
        check_image_size(
            height, width, p["shortest_edge"], p["crop_size"], p["do_resize"], p["do_center_crop"]
        )

    def __post_init__(self) -> None:
        crop_h, crop_w = self.image_processor["crop_size"]
        size = self.hf_config.vision.image_size
        if (crop_h, crop_w) != (size, size):
            raise ValueError(
                f"the image processor crops to {crop_h}x{crop_w} but the vision tower takes "
                f"{size}x{size} images"
            )


# generation_config.json keys that set a sampling default, and the SamplingParams field each
# sets (vLLM's --generation-config auto reads the same ones).
_GENERATION_DEFAULT_KEYS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def _generation_defaults(gen: dict[str, Any], folder: Path) -> dict[str, Any]:
    """The sampling defaults the checkpoint's generation config sets (SamplingParams keywords),
    e.g. Llama 3's {"temperature": 0.6, "top_p": 0.9}; {} without one. A value of the wrong
    type is a ValueError naming it. ``gen``: the parsed generation_config.json of ``folder``."""
    defaults: dict[str, Any] = {}
    for key, name in _GENERATION_DEFAULT_KEYS.items():
        value = gen.get(key)
        if value is None:
            continue
        integral = name in ("top_k", "max_tokens")
        if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
            raise ValueError(
                f"{folder / 'generation_config.json'}: {key} must be "
                f"{'an integer' if integral else 'a number'}, got {value!r}"
            )
        defaults[name] = value if integral else float(value)
    return defaults


def _eos_token_ids(gen: dict[str, Any], config: LlavaConfig, tokenizer: Any) -> tuple[int, ...]:
    """Every end-of-sequence id, the primary one first. The primary one is what HF generate
    stops on first: the generation config's (the first of a list), else config.json's, else the
    tokenizer's. The others: the rest of the generation config's list (Llama 3 lists
    end_of_text, eom and eot) and the tokenizer's own EOS, which vLLM stops on too. ``gen``: the
    parsed generation_config.json."""
    ids: list[int] = []
    for candidate in (gen.get("eos_token_id"), config.text.eos_token_id):
        if candidate is None or candidate == []:
            continue
        ids.extend(int(i) for i in (candidate if isinstance(candidate, list) else [candidate]))
        break
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    return tuple(dict.fromkeys(ids))
