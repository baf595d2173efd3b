"""XrayGPT: a frozen image encoder and a frozen causal LM joined by one trained linear projection.

    pixel_values (B, 3, H, W)
      -> encoder (frozen)        image features (B, T, D_img)
      -> llama_proj (trained)    image embeds   (B, T, D_llm)
      -> spliced into the prompt embeddings where the `<ImageHere>` slots stand (IMAGE_TOKEN_ID)
      -> llm (frozen)            next-token loss on the answer only / generation

Image features and the merge are separate methods (as in transformers' LLaVA), so a feature cache can skip
the encoder, and a slot/image count mismatch fails loudly with both counts.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from xraygpt.config import atomic_write_text, from_dict
from xraygpt.conversation import DEFAULT_INSTRUCTION, get_template
from xraygpt.encoders import EncoderConfig, ImageEncoder, build_encoder
from xraygpt.llm import LLMConfig, load_llm
from xraygpt.processing import IGNORE_INDEX, IMAGE_TOKEN_ID, PromptProcessor

log = logging.getLogger(__name__)

CONFIG_NAME = "xraygpt_config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class ModelConfig:
    """Everything needed to rebuild the model; saved next to the trained weights."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "xraygpt"  # see xraygpt.conversation.TEMPLATES
    max_txt_len: int = 160  # answer tokens kept for training (the original's max_txt_len)
    add_bos: bool = True
    proj_bias: bool = True

    def validate(self) -> None:
        get_template(self.template)
        if self.max_txt_len < 1:
            raise ValueError(f"model.max_txt_len must be >= 1, got {self.max_txt_len}")


@dataclass
class GenerationConfig:
    """Deterministic by default: greedy, no sampling."""

    max_new_tokens: int = 160
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 0.9
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    min_new_tokens: int = 1
    no_repeat_ngram_size: int = 0  # > 0: an n-gram may occur once in an answer (0 = off)
    # Classifier-free guidance on the image (greedy or beam search): next-token log-probs
    # l(null) + s * (l(image) - l(null)), where null is the same prompt with zero image features (the projection's
    # bias alone). 1.0 = off; s > 1 makes the answer follow the film more than the LLM's language prior (a frozen
    # LLM's pull toward the most common report); each step then runs the LLM on twice the batch.
    image_guidance: float = 1.0

    def __post_init__(self):
        if self.image_guidance < 0:
            raise ValueError(f"generation.image_guidance must be >= 0 (1.0 = off), got {self.image_guidance}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"generation.no_repeat_ngram_size must be >= 0 (0 = off), got {self.no_repeat_ngram_size}")
        if self.image_guidance != 1.0 and self.do_sample:
            raise ValueError("generation.image_guidance != 1 needs greedy or beam search (do_sample=false): the "
                             "guided and unguided rows must read the same tokens")


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def refusal_reason(error: Exception) -> str:
    """What torch's weights_only unpickler refused, e.g. 'it would call posix.system', without torch's advice to
    retry with weights_only=False (never right for a file of unknown origin)."""
    match = re.search(r"GLOBAL ([\w.]+)", str(error))
    return f"it would call {match.group(1)}" if match else "it holds Python objects, not only tensors"


class ImageGuidance:
    """Logits processor for a batch [image rows; null-image rows] (each half B * beams rows, same order):
    both halves get l_null + s * (l_image - l_null) on log-probs, so they keep choosing the same tokens."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if scores.shape[0] % 2:
            raise ValueError(f"image guidance needs [image; null] row pairs, got {scores.shape[0]} rows")
        logp = torch.log_softmax(scores.float(), dim=-1)  # (2N, V)
        image, null = logp.chunk(2)  # (N, V) each
        guided = null + self.scale * (image - null)
        banned = torch.isneginf(image) | torch.isneginf(null)  # e.g. EOS before min_new_tokens: -inf - -inf is nan
        guided = guided.masked_fill(banned, float("-inf"))
        return torch.cat([guided, guided]).to(scores.dtype)


class XrayGPT(nn.Module):
    def __init__(self, config: ModelConfig, encoder: ImageEncoder | None = None, llm: nn.Module | None = None,
                 tokenizer: Any = None):
        super().__init__()
        config.validate()
        self.config = config
        self.encoder = encoder if encoder is not None else build_encoder(config.encoder)
        if llm is None or tokenizer is None:
            llm, tokenizer = load_llm(config.llm)
        self.llm = llm
        self.tokenizer = tokenizer
        self.template = get_template(config.template)
        self._end_marker_criteria = None  # built on first generate (see _stop_at_end_marker)
        d_img, d_llm = self.encoder.hidden_size, self.llm.get_input_embeddings().embedding_dim
        self.llama_proj = nn.Linear(d_img, d_llm, bias=config.proj_bias)  # the only trained module
        self.processor = PromptProcessor(tokenizer, self.template, self.encoder.num_tokens,
                                         max_txt_len=config.max_txt_len, add_bos=config.add_bos)
        for frozen in (self.encoder, self.llm):
            for p in frozen.parameters():
                p.requires_grad_(False)
        self.train(False)

    # ----------------------------------------------------------------------------------------- building
    @classmethod
    def from_config(cls, config: ModelConfig) -> XrayGPT:
        return cls(config)

    def train(self, mode: bool = True) -> XrayGPT:
        """Only the projection ever trains; the frozen parts stay in eval mode (no dropout)."""
        super().train(mode)
        self.encoder.eval()
        self.llm.eval()
        return self

    @property
    def num_image_tokens(self) -> int:
        return self.encoder.num_tokens

    def parameter_counts(self) -> dict[str, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return {"trainable": trainable, "frozen": total - trainable, "total": total}

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.llama_proj.state_dict(prefix="llama_proj.").items()}

    # -------------------------------------------------------------------------------------- image path
    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, T, D_img) from the frozen encoder."""
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be (B, 3, H, W), got shape {tuple(pixel_values.shape)}")
        p = next(self.encoder.parameters(), None)
        if p is not None:
            pixel_values = pixel_values.to(device=p.device, dtype=p.dtype)
        trainable = any(q.requires_grad for q in self.encoder.parameters())
        with torch.set_grad_enabled(trainable and torch.is_grad_enabled()):
            return self.encoder(pixel_values)

    def project(self, image_features: torch.Tensor) -> torch.Tensor:
        """(B, T, D_img) -> (B, T, D_llm)."""
        w = self.llama_proj.weight
        return self.llama_proj(image_features.to(device=w.device, dtype=w.dtype))

    def encode_images(self, pixel_values: torch.Tensor | None = None,
                      image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Image embeds (B, T, D_llm) from pixels, or from cached encoder features (B, T, D_img)."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("give exactly one of pixel_values or image_features")
        if image_features is None:
            image_features = self.get_image_features(pixel_values)
        if image_features.shape[1:] != (self.num_image_tokens, self.encoder.hidden_size):
            raise ValueError(f"image features of shape {tuple(image_features.shape)} do not match the encoder: "
                             f"expected (B, {self.num_image_tokens}, {self.encoder.hidden_size})")
        return self.project(image_features)

    def merge_image_features(self, input_ids: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        """Token embeddings (B, L, D_llm) with the image slots replaced by image embeds, vectorised."""
        slots = input_ids == IMAGE_TOKEN_ID  # (B, L)
        embedding = self.llm.get_input_embeddings()
        inputs_embeds = embedding(input_ids.clamp(min=0).to(embedding.weight.device))  # (B, L, D_llm)
        n_slots, n_image_tokens = int(slots.sum()), image_embeds.shape[0] * image_embeds.shape[1]
        if n_slots != n_image_tokens:
            raise ValueError(
                f"the prompts hold {n_slots // self.num_image_tokens} image slots ({n_slots} tokens) but "
                f"{image_embeds.shape[0]} images were given ({n_image_tokens} tokens): every prompt needs exactly "
                f"one '<ImageHere>' per image")
        slots = slots.to(inputs_embeds.device).unsqueeze(-1)  # (B, L, 1)
        return inputs_embeds.masked_scatter(slots, image_embeds.to(inputs_embeds.dtype))

    # ---------------------------------------------------------------------------------------- training
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                num_items_in_batch: torch.Tensor | int | None = None, **_: Any):
        """With `labels`: `.loss` is the mean next-token loss over answer tokens and `.logits` is None.
        Without: the LLM's full output (`.logits` (B, L, V)).

        With `num_items_in_batch` the loss is the token-loss *sum* divided by that count instead, so gradient
        accumulation and several processes can normalise by the answer tokens of the whole global batch.
        """
        image_embeds = self.encode_images(pixel_values, image_features)
        inputs_embeds = self.merge_image_features(input_ids, image_embeds)
        device = inputs_embeds.device
        attention_mask = attention_mask.to(device)
        if labels is None or not self._can_score_answers_only():
            extra = {} if num_items_in_batch is None else {"num_items_in_batch": num_items_in_batch}
            return self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                            labels=None if labels is None else labels.to(device), use_cache=False, **extra)
        hidden = self.llm.get_decoder()(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                        use_cache=False).last_hidden_state          # (B, L, H)
        return CausalLMOutputWithPast(loss=self.answer_loss(hidden, labels.to(device), num_items_in_batch))

    def answer_loss(self, hidden: torch.Tensor, labels: torch.Tensor,
                    num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
        """Next-token cross-entropy from the last hidden states, with the LM head run on answer positions only.

        The same number as the LLM's own loss (float32 logits, ignore_index -100), but the (B, L, V) logits
        of a 49k vocabulary never exist: on the embedded default that is ~1 GB of a stage-1 step's peak.
        """
        targets = labels[:, 1:].reshape(-1)                                         # (B*(L-1),)
        hidden = hidden[:, :-1].reshape(targets.numel(), -1)                        # (B*(L-1), H)
        # Answer positions, plus a few ignored ones so the count is a multiple of 64: the head's matmul then
        # sees few distinct shapes and CPU kernel caches do not grow step after step.
        order = torch.argsort((targets == IGNORE_INDEX).to(torch.int8), stable=True)
        n = int((targets != IGNORE_INDEX).sum())
        rows = order[:min(targets.numel(), -(-n // 64) * 64)]                        # (N,)
        logits = self.llm.get_output_embeddings()(hidden[rows]).float()             # (N, V)
        reduction = "mean" if num_items_in_batch is None else "sum"
        loss = nn.functional.cross_entropy(logits, targets[rows], ignore_index=IGNORE_INDEX, reduction=reduction)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss

    def _can_score_answers_only(self) -> bool:
        """Answer-only scoring needs a plain decoder + linear head (no logit soft-capping or scaling)."""
        cfg = self.llm.config
        plain = getattr(cfg, "final_logit_softcapping", None) is None and getattr(cfg, "logit_scale", None) is None
        return plain and hasattr(self.llm, "get_decoder") and self.llm.get_output_embeddings() is not None

    # -------------------------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, pixel_values: torch.Tensor | None = None, instructions: str | Sequence[str] | None = None,
                 image_features: torch.Tensor | None = None, generation: GenerationConfig | None = None,
                 **overrides: Any) -> list[str]:
        """Batched generation: one answer per image, end marker stripped. Greedy unless told otherwise."""
        gen = generation or GenerationConfig()
        for key, value in overrides.items():
            if not hasattr(gen, key):
                raise TypeError(f"unknown generation setting '{key}'; valid: {list(asdict(gen))}")
            gen = GenerationConfig(**{**asdict(gen), key: value})
        n = (pixel_values if pixel_values is not None else image_features).shape[0]
        if instructions is None:
            instructions = [DEFAULT_INSTRUCTION] * n
        elif isinstance(instructions, str):
            instructions = [instructions] * n
        if len(instructions) != n:
            raise ValueError(f"{n} images but {len(instructions)} instructions")
        batch = self.processor(list(instructions), padding_side="left")
        image_embeds = self.encode_images(pixel_values, image_features)  # (B, T, D_llm)
        return self.generate_from_ids(batch["input_ids"], batch["attention_mask"], image_embeds, gen)

    def generate_from_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor,
                          gen: GenerationConfig) -> list[str]:
        """Answers for prompts (B, L) whose image slots take `image_embeds` (B, T, D_llm); adds the null-image
        rows that `gen.image_guidance` compares against."""
        n = input_ids.shape[0]
        inputs_embeds = self.merge_image_features(input_ids, image_embeds)  # (B, L, D_llm)
        if gen.image_guidance != 1.0:  # rows B..2B-1: the same prompts with the null image
            null = self.null_image_embeds(n, image_embeds)  # (B, T, D_llm)
            inputs_embeds = torch.cat([inputs_embeds, self.merge_image_features(input_ids, null)])  # (2B, L, D)
            attention_mask = torch.cat([attention_mask, attention_mask])  # (2B, L)
        return self.generate_from_embeds(inputs_embeds, attention_mask, gen)[:n]

    def null_image_embeds(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """(n, T, D_llm): what image guidance contrasts a film against, zero image features (the projection's bias
        alone); `like` gives the device and dtype."""
        return self.project(like.new_zeros(n, self.num_image_tokens, self.encoder.hidden_size))

    def generate_from_embeds(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor,
                             gen: GenerationConfig) -> list[str]:
        """Answers for a batch of prompt embeds; with image guidance the batch must be [image rows; null-image
        rows] (as `generate_from_ids` builds it) and both halves come back (identical texts)."""
        from transformers import LogitsProcessorList

        tok = self.tokenizer
        guidance = [] if gen.image_guidance == 1.0 else [ImageGuidance(gen.image_guidance)]
        out = self.llm.generate(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask.to(inputs_embeds.device),
            max_new_tokens=gen.max_new_tokens, min_new_tokens=gen.min_new_tokens, num_beams=gen.num_beams,
            do_sample=gen.do_sample, temperature=gen.temperature if gen.do_sample else None,
            top_p=gen.top_p if gen.do_sample else None, top_k=None,
            repetition_penalty=gen.repetition_penalty, length_penalty=gen.length_penalty,
            no_repeat_ngram_size=gen.no_repeat_ngram_size or None,
            stopping_criteria=self._stop_at_end_marker(), logits_processor=LogitsProcessorList(guidance),
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        return [self.strip_answer(t) for t in texts]

    def _stop_at_end_marker(self):
        """Stop a sample at the template's end marker. Built once per model: transformers would rebuild it from the
        tokenizer's whole vocabulary on every generate call (`stop_strings=`), a fixed cost per batch."""
        from transformers import StoppingCriteriaList, StopStringCriteria

        if self._end_marker_criteria is None:
            self._end_marker_criteria = StopStringCriteria(self.tokenizer, [self.template.end_sym])
        return StoppingCriteriaList([self._end_marker_criteria])

    def strip_answer(self, text: str) -> str:
        """Cut at the end marker (a new turn starts with it too)."""
        return text.split(self.template.end_sym)[0].strip()

    # --------------------------------------------------------------------------------------- inference api
    def summarize(self, images: Any, batch_size: int = 8, **kwargs: Any) -> str | list[str]:
        """Summaries of films (paths, PIL images, pixel tensors): a str for one film, a list for a list.

        Thin wrapper over `xraygpt.inference.summarize` (question=, progress=, generation settings as keywords).
        """
        from xraygpt.inference import summarize

        return summarize(self, images, batch_size=batch_size, **kwargs)

    def chat(self, image: Any, **kwargs: Any):
        """A `xraygpt.chat.Conversation` about one film: `conv = model.chat(path); conv.ask("...")`."""
        from xraygpt.chat import Conversation

        return Conversation(self, image, **kwargs)

    # -------------------------------------------------------------------------------------- save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Trainable weights (safetensors) + the config that rebuilds the frozen parts."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{WEIGHTS_NAME}.tmp"
        save_file(self.trainable_state_dict(), str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_NAME)
        meta = {
            "model": asdict(self.config),
            "shapes": {"image_tokens": self.num_image_tokens, "d_img": self.encoder.hidden_size,
                       "d_llm": self.llama_proj.out_features},
            "encoder_identity": self.encoder.identity(),
        }
        atomic_write_text(directory / CONFIG_NAME, json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, **components: Any) -> XrayGPT:
        """Rebuild from `save_pretrained` output, or from an original XrayGPT `.pth` plus a config."""
        directory = Path(directory)
        config_file = directory / CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{directory} has no {CONFIG_NAME}: it is not an XrayGPT model folder. For an original XrayGPT "
                f".pth, build the model from a config and call model.load_original_checkpoint(path).")
        try:
            meta = json.loads(config_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config_file}: not a valid JSON model config ({e}); re-save the model with "
                             f"save_pretrained, or copy the folder again") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
            raise ValueError(f"{config_file}: expected an object with a 'model' section (as save_pretrained writes "
                             f"it); re-save the model with save_pretrained")
        config = from_dict(ModelConfig, meta["model"], where=str(config_file))
        model = cls(config, **components)
        model.load_trainable(directory / WEIGHTS_NAME)
        return model

    def _check_projection(self, state: dict[str, torch.Tensor], source: str) -> None:
        expected = {k: tuple(v.shape) for k, v in self.llama_proj.state_dict(prefix="llama_proj.").items()}
        for key, shape in expected.items():
            if key not in state:
                raise KeyError(f"{source} has no '{key}' (keys: {sorted(state)[:8]})")
            if tuple(state[key].shape) != shape:
                raise ValueError(
                    f"{source}: '{key}' has shape {tuple(state[key].shape)} but this model expects {shape} "
                    f"(LLM '{self.config.llm.name_or_path}' width {self.llama_proj.out_features}, encoder "
                    f"'{self.config.encoder.type}:{self.config.encoder.name}' width {self.encoder.hidden_size}). "
                    f"The checkpoint was trained for another encoder/LLM pair.")

    def load_trainable(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"trained weights not found: {path}")
        try:
            state = load_file(str(path))
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise ValueError(f"{path}: cannot read the trained weights ({e}); the file is truncated or corrupt: copy "
                             f"it again, or use another checkpoint (e.g. the run's checkpoints/step_*)") from None
        self._check_projection(state, str(path))
        self.llama_proj.load_state_dict({k.removeprefix("llama_proj."): v for k, v in state.items()
                                         if k.startswith("llama_proj.")})

    def load_original_checkpoint(self, path: str | Path) -> None:
        """Import an original XrayGPT/MiniGPT-4 `.pth` (`{"model": {"llama_proj.weight", ...}}`); other keys ignored."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:  # weights_only refused it: it holds code, not just tensors
            raise ValueError(f"{path}: refusing to load (only plain tensor checkpoints are accepted with "
                             f"weights_only=True): {refusal_reason(e)}. Re-save it as "
                             f"torch.save({{'model': state_dict}}, path) from code you trust") from None
        except Exception as e:  # truncated zip, empty file, not a torch file
            raise ValueError(f"{path}: not a readable torch checkpoint ({_first_line(e)}); the file is "
                             f"empty, truncated or not a .pth: download or export it again") from None
        state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"{path}: expected a dict with a 'model' state dict, got {type(ckpt).__name__}")
        self._check_projection(state, str(path))
        self.llama_proj.load_state_dict({"weight": state["llama_proj.weight"], "bias": state["llama_proj.bias"]}
                                        if self.config.proj_bias else {"weight": state["llama_proj.weight"]})

    def export_original_checkpoint(self, path: str | Path) -> Path:
        """Write the original `.pth` layout, so original XrayGPT code can load our projection."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        torch.save({"model": self.trainable_state_dict()}, tmp)
        tmp.replace(path)
        return path
