"""The step plan: everything a rank needs to run one forward step, and its wire format.

Rank 0's scheduler builds a `StepInput` each step and broadcasts it to its peers through the
replica's process group (Ray is not in the per-step loop). Tokens of all scheduled sequences are
packed into one flat batch: first one token for each decoding sequence, then each prefill chunk's
tokens. The wire format is a fixed header followed by one flat int64 payload::

    header  = [kind, tokens, seqs, max_blocks, logits, decodes, 0, 0]
    payload = input_ids | positions | slot_mapping | query_lens | context_lens
              | block_tables (seqs × max_blocks, padded with 0) | logits_indices
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

HEADER_LEN = 8


class Kind(enum.IntEnum):
    STEP = 1
    STOP = 2  # peers leave their follow loop
    IDLE = 3  # nothing to run: sent while idle so that no collective ever waits past its timeout


@dataclass
class StepInput:
    input_ids: torch.Tensor  # (tokens,)
    positions: torch.Tensor  # (tokens,) position of each token in its sequence
    slot_mapping: torch.Tensor  # (tokens,) KV-cache slot receiving each token's K/V
    query_lens: torch.Tensor  # (seqs,) tokens of each sequence in this step (1 for a decode)
    context_lens: torch.Tensor  # (seqs,) tokens each sequence attends over, this step's included
    block_tables: torch.Tensor  # (seqs, max_blocks) block ids, padded with 0
    logits_indices: torch.Tensor  # (logits,) packed tokens whose next-token logits are wanted, ascending
    num_decodes: int  # the first `num_decodes` sequences are decodes, in the first tokens
    wire: torch.Tensor | None = None  # the payload these tensors are views of, where they are

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.query_lens.shape[0])

    def header(self, kind: Kind = Kind.STEP) -> torch.Tensor:
        h = torch.zeros(HEADER_LEN, dtype=torch.int64)
        h[:6] = torch.tensor([
            kind, self.num_tokens, self.num_seqs, self.block_tables.shape[1],
            self.logits_indices.shape[0], self.num_decodes,
        ])
        return h

    def payload(self) -> torch.Tensor:
        if self.wire is not None:
            return self.wire
        return torch.cat([
            self.input_ids, self.positions, self.slot_mapping, self.query_lens,
            self.context_lens, self.block_tables.reshape(-1), self.logits_indices,
        ]).to(torch.int64)

    @staticmethod
    def payload_len(header: torch.Tensor) -> int:
        _, tokens, seqs, max_blocks, logits, _ = header[:6].tolist()
        return 3 * tokens + 2 * seqs + seqs * max_blocks + logits

    @classmethod
    def from_wire(cls, header: torch.Tensor, payload: torch.Tensor) -> "StepInput":
        _, tokens, seqs, max_blocks, logits, decodes = header[:6].tolist()
        return cls.views(payload, tokens, seqs, max_blocks, logits, decodes)

    @classmethod
    def views(cls, payload: torch.Tensor, tokens: int, seqs: int, max_blocks: int, logits: int,
              decodes: int) -> "StepInput":
        """The step whose fields are views of `payload` (the wire layout above), on its device."""
        sizes = [tokens, tokens, tokens, seqs, seqs, seqs * max_blocks, logits]
        ids, pos, slots, qlens, clens, tables, li = payload.split(sizes)
        return cls(ids, pos, slots, qlens, clens, tables.view(seqs, max_blocks), li, decodes, payload)

    @classmethod
    def build(cls, seqs: list[tuple[list[int], int, list[int]]], block_size: int,
              logits: str | list[bool] = "last") -> "StepInput":
        """From (new token ids, tokens already cached, block table) per sequence, decodes first.
        `logits`: "last" = each sequence's last token, "all" = every token, or per sequence
        whether its last token's logits are wanted."""
        ids, pos, slots, qlens, clens, idx = [], [], [], [], [], []
        num_decodes = 0
        for k, (new, cached, table) in enumerate(seqs):
            if len(new) == 1 and num_decodes == len(qlens):
                num_decodes += 1
            start = len(ids)
            ids += new
            for p in range(cached, cached + len(new)):
                pos.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
            qlens.append(len(new))
            clens.append(cached + len(new))
            if logits == "all":
                idx += range(start, len(ids))
            elif logits == "last" or logits[k]:
                idx.append(len(ids) - 1)
        width = max((len(t) for _, _, t in seqs), default=0)
        flat = ids + pos + slots + qlens + clens
        for _, _, t in seqs:
            flat += t
            flat += [0] * (width - len(t))
        flat += idx
        # One tensor, the payload itself, and the fields views of it: a torch.tensor call costs
        # ~8 us, seven of them were ~1 % of a batch-1 decode step, and peers get it as it is.
        return cls.views(torch.tensor(flat, dtype=torch.int64), len(ids), len(seqs), width, len(idx), num_decodes)
