"""The swap prior's row split: each rank searches some row chunks of a Linear against the same H.

The search (masks/local_search.py) treats rows in fixed chunks of ``row_chunk`` rows, and a chunk's
result depends only on its own rows and H. So the rows of the Linears that share one H (q/k/v,
gate/up) are stacked, cut into chunks, and the chunks are dealt out to the ranks; each rank searches
its own, and every rank then receives the others' chunks as packed bits (one broadcast per rank). Every chunk is searched with tensors of the
same shapes whatever the rank count, so 1, 2 or 64 ranks give the same bits, given the same H.

Every rank computes that H itself from the full calibration set (the forwards are duplicated, the
search is split): a sum over the calibration tokens split over ranks would add the partial sums in
another order than one process does, and the masks would depend on the rank count. At scale the
search, not the forward, is the cost (docs/scaling.md).

Launch: like training (torchrun, deepspeed, mpirun, srun; maskpro_ds/distributed.py maps their
variables). With one rank no process group is created.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from maskpro_ds.masks.local_search import SearchConfig, SearchStats, local_search, row_chunks
from maskpro_ds.masks.nm import pack_bits, unpack_bits


def launched_world_size() -> int:
    """How many ranks the launcher started (1 for a plain ``python`` run); sets nothing."""
    from maskpro_ds.distributed import map_launcher_env

    env = dict(os.environ)
    map_launcher_env(env)
    return int(env["WORLD_SIZE"])


@dataclass
class RowSplit:
    """This process's place among the ranks that share the search (rank 0 of 1 by default)."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  # this split created the process group (a prior run), not a trainer's

    @classmethod
    def from_launcher(cls) -> RowSplit:
        """Join the launcher's process group when there is more than one rank."""
        if launched_world_size() == 1:
            return cls()
        import torch.distributed

        from maskpro_ds.distributed import init_distributed

        joined = torch.distributed.is_initialized()  # the trainer's warm start runs inside its group
        info = init_distributed()
        return cls(rank=info.rank, world=info.world_size, owns_group=not joined)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def owners(self, sizes: list[int]) -> list[int]:
        """Owner rank of each chunk: largest chunks first, each to the least loaded rank (ties to
        the lower rank, then the earlier chunk), so the split is a pure function of the sizes."""
        load = [0] * self.world
        owner = [0] * len(sizes)
        for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
            rank = min(range(self.world), key=lambda r: (load[r], r))
            owner[index] = rank
            load[rank] += sizes[index]
        return owner

    def search(
        self,
        layers: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        hessian: torch.Tensor,
        n: int,
        m: int,
        config: SearchConfig,
    ) -> tuple[dict[str, torch.Tensor], SearchStats]:
        """Search the Linears that read the input whose H is ``hessian`` (name -> (weight, starting
        mask, linear term or None)); every rank returns every layer's full mask, and the stats.

        Their rows are stacked (q, k, v: 576 + 192 + 192 rows on SmolLM2) and cut into chunks of
        ``row_chunk``: fewer, fuller chunks than layer by layer, and a chunk may span two layers."""
        weight = torch.cat([w for w, _, _ in layers.values()])
        start = torch.cat([s for _, s, _ in layers.values()])
        linears = [b for _, _, b in layers.values()]
        linear = None if linears[0] is None else torch.cat(linears)
        chunks = row_chunks(weight.shape[0], config.row_chunk)
        owner = self.owners([r1 - r0 for r0, r1 in chunks])
        found: dict[int, tuple[torch.Tensor, SearchStats]] = {}
        for index, (r0, r1) in enumerate(chunks):
            if owner[index] == self.rank:
                b = None if linear is None else linear[r0:r1]
                found[index] = local_search(weight[r0:r1], hessian, start[r0:r1], n, m, config, linear=b)
        if self.world > 1:
            found = self._exchange(chunks, owner, found, weight.shape[1])
        mask = torch.empty_like(start)
        stats = SearchStats()
        for index, (r0, r1) in enumerate(chunks):  # chunk order: stats fold the same on any rank count
            mask[r0:r1] = found[index][0].to(mask.device)
            stats.add(found[index][1])
        out, r0 = {}, 0
        for name, (w, _, _) in layers.items():
            out[name] = mask[r0 : r0 + w.shape[0]]
            r0 += w.shape[0]
        return out, stats

    def _exchange(self, chunks, owner, found, cols: int) -> dict[int, tuple[torch.Tensor, SearchStats]]:
        """Every rank broadcasts its chunks' masks (packed bits, in chunk order) and stats."""
        import deepspeed.comm as dist
        import torch.distributed

        from maskpro_ds.distributed import broadcast_object

        # NCCL moves GPU buffers only, gloo CPU ones.
        nccl = torch.distributed.get_backend() == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        result = dict(found)
        for src in range(self.world):
            mine = [i for i in range(len(chunks)) if owner[i] == src]
            if not mine:
                continue
            sizes = [(chunks[i][1] - chunks[i][0]) * ((cols + 7) // 8) for i in mine]
            if src == self.rank:
                buf = torch.cat([pack_bits(found[i][0]).reshape(-1) for i in mine]).to(device)
                stats = [found[i][1] for i in mine]
            else:
                buf = torch.empty(sum(sizes), dtype=torch.uint8, device=device)
                stats = None
            dist.broadcast(buf, src=src)
            stats = broadcast_object(stats, src=src)
            if src != self.rank:
                for i, piece, st in zip(mine, buf.cpu().split(sizes), stats, strict=True):
                    result[i] = (unpack_bits(piece.view(chunks[i][1] - chunks[i][0], -1), cols), st)
        return result

    def close(self) -> None:
        """Leave the process group if this split created it (multi-rank prior runs only)."""
        if self.world > 1 and self.owns_group:
            from maskpro_ds.distributed import destroy

            destroy()
