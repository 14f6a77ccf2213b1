"""An encoder-decoder T5 over SID tokens, as in TIGER: the history goes to the encoder,
the SID is decoded after a start token (PAD). NEZHA's placeholders go to the decoder
input: [start, <sp_1> .. <sp_L>], h_0 being the start token's state.

With a causal encoder (--encoder causal) each history token reads only those before it,
so the encoder states of a history prefix are those of the prefix alone: one encoder pass
over a window serves every target in it, each decoded against its prefix (a cross-attention
mask), which is how such a model trains (models/objectives.py)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Attention

from bench.data.catalog import PAD
from models.backbones import ENCODER_DECODER, DecodeState, generic_size


class EncoderDecoderLM(nn.Module):
    kind = ENCODER_DECODER

    def __init__(
        self,
        name: str,
        vocab_size: int,
        dropout: float = 0.0,
        attention: str = "sdpa",
        shape: tuple | None = None,
        causal_encoder: bool = False,
        attention_dropout: float | None = None,  # None: `dropout`
    ):
        super().__init__()
        hidden, layers, heads, _, ffn = shape or generic_size(name)
        config = T5Config(
            vocab_size=vocab_size,
            d_model=hidden,
            d_ff=ffn,
            d_kv=hidden // heads,
            num_layers=layers,
            num_decoder_layers=layers,
            num_heads=heads,
            dropout_rate=dropout,
            pad_token_id=PAD,
            decoder_start_token_id=PAD,
            eos_token_id=None,
            bos_token_id=None,
            tie_word_embeddings=True,
            attn_implementation=attention,
        )
        self.lm = T5ForConditionalGeneration(config)
        if attention_dropout is not None:  # T5's config has one rate; each attention module reads its own copy
            for module in self.lm.modules():
                if isinstance(module, T5Attention):
                    module.dropout = attention_dropout
        self.hidden_size = hidden
        if causal_encoder:  # on the way in, so generate's own encoder call masks causally too
            self.lm.get_encoder().register_forward_pre_hook(causal_encoder_mask, with_kwargs=True)

    @property
    def core(self) -> nn.Module:
        """One call of the decoder stack is one backbone call (the encoder runs inside the first)."""
        return self.lm

    def _start(self, history: torch.Tensor) -> torch.Tensor:
        return torch.full((history.shape[0], 1), PAD, dtype=torch.long, device=history.device)

    def _decode_pass(self, history, mask, decoder_tokens, layout, **extra):
        """layout None: every decoder token reads the whole history, causally among
        themselves. layout (decoder_mask [B, 1, m, m], cross_mask [B, 1, m, T]): several
        targets packed in one decoder row, each reading its own history prefix (causal
        encoder only)."""
        if layout is None:
            return self.lm(
                input_ids=history, attention_mask=mask, decoder_input_ids=decoder_tokens, use_cache=False, **extra
            )
        encoded = self.lm.get_encoder()(input_ids=history, attention_mask=mask).last_hidden_state
        decoder_mask, cross_mask = layout
        return self.lm(
            encoder_outputs=(encoded,),
            attention_mask=cross_mask,
            decoder_input_ids=decoder_tokens,
            decoder_attention_mask=decoder_mask,
            use_cache=False,
            **extra,
        )

    def decoder_hidden(self, history, mask, decoder_tokens, layout=None) -> torch.Tensor:
        """history [B, T] to the encoder, decoder_tokens [B, m] -> decoder states [B, m, d]."""
        out = self._decode_pass(history, mask, decoder_tokens, layout, output_hidden_states=True)
        return out.decoder_hidden_states[-1]

    def logits(self, history, mask, decoder_tokens, layout=None) -> torch.Tensor:
        """Training pass: -> [B, m, V]."""
        return self._decode_pass(history, mask, decoder_tokens, layout).logits

    def bare_forward(self, history, mask) -> None:
        self.lm(input_ids=history, attention_mask=mask, decoder_input_ids=self._start(history), use_cache=False)

    def nezha_states(self, history, mask, placeholders: torch.Tensor | None):
        tokens = self._start(history)
        if placeholders is not None:
            tokens = torch.cat([tokens, placeholders.expand(history.shape[0], -1)], 1)
        hidden = self.decoder_hidden(history, mask, tokens)
        return hidden[:, 0], (hidden[:, 1:] if placeholders is not None else None)

    def generation_prompt_length(self, history) -> int:
        return 1  # generate's output starts with the decoder start token

    def prefill(self, history, mask) -> tuple[torch.Tensor, DecodeState]:
        encoded = self.lm.get_encoder()(input_ids=history, attention_mask=mask).last_hidden_state
        out = self.lm(
            encoder_outputs=(encoded,),
            attention_mask=mask,
            decoder_input_ids=self._start(history),
            use_cache=True,
        )
        state = DecodeState(
            out.cache,
            mask,
            torch.ones(history.shape[0], dtype=torch.long, device=history.device),
            memory=encoded,
        )
        return out.logits[:, -1], state

    def extend(self, state: DecodeState, tokens: torch.Tensor) -> tuple[torch.Tensor, DecodeState]:
        out = self.lm(
            encoder_outputs=(state.memory,),
            attention_mask=state.mask,
            decoder_input_ids=tokens,
            cache=state.cache,
            use_cache=True,
        )
        return out.logits, DecodeState(
            out.cache, state.mask, state.next_position + tokens.shape[1], memory=state.memory
        )

    @staticmethod
    def select(state: DecodeState, rows: torch.Tensor) -> DecodeState:
        state.cache.reorder_cache(rows)
        return DecodeState(state.cache, state.mask[rows], state.next_position[rows], memory=state.memory[rows])


def causal_encoder_mask(module, args, kwargs):
    """Forward pre-hook of the encoder stack: its padding mask [B, T] becomes a causal
    one [B, 1, T, T] (token t reads the unpadded tokens up to t), which T5's stack takes
    as it is."""
    mask = kwargs.get("attention_mask")
    if mask is None:
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs["inputs_embeds"][..., 0]
        mask = torch.ones(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    if mask.dim() == 2:
        width = mask.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool, device=mask.device).tril()
        kwargs["attention_mask"] = (causal & mask.bool()[:, None, :]).unsqueeze(1)
    return args, kwargs
