"""Serving under expert parallelism: one Engine per rank, rank 0 serving HTTP.

Attention runs data-parallel: each rank's Engine holds only the requests assigned to it (to the rank with the
fewest live requests), while every MoE layer's dispatch is a collective over all ranks, so every rank calls
engine.step() together (a rank without requests feeds empty batches). On rank 0 an EPFront stands in for the
Engine behind the EngineLoop; each of its steps is one round on a gloo group of its own (an NCCL group would
carry Python objects through the GPU): rank 0 scatters to each rank its new requests and aborts, every rank
applies them and steps, and rank 0 gathers the outputs and stats. An output crosses as what is new since the
rank's last one (tokens, text, logprobs; the prompt once it is scored: `Deltas`), so a round's traffic does not
grow with the answers' lengths; rank 0 keeps each request's whole output and prompt ids. The
other ranks run that round in `follow` until rank 0 sends the stop. While no rank has work, rank 0 waits on its
queue and the others wait in the scatter; the EngineLoop's heartbeat (an empty round every HEARTBEAT_S) keeps
that wait well inside the group's timeout.
"""

from __future__ import annotations

import dataclasses

import torch.distributed as dist
from torch.distributed import ProcessGroup

from dsr1.engine.engine import Engine, EngineStats, RequestOutput, SamplingParams
from dsr1.engine.load import gather_to_rank0
from dsr1.parallel.dist import new_cpu_group
from dsr1.serve.engine_loop import Refused

HEARTBEAT_S = 60.0  # an idle server's empty round: far inside torch.distributed's default timeout (10 min NCCL, 30 min gloo)

# What rank 0 sends a rank each round: ("add", request_id, prompt ids, SamplingParams) and ("abort", request_id)
# commands; None ends `follow`. What a rank sends back: Report.


@dataclasses.dataclass
class Report:
    outputs: list[RequestOutput]  # what is new since each request's last output (Deltas.cut)
    refused: list[tuple[str, str]]  # (request_id, why add_request raised)
    stats: EngineStats


def expert_parallel(engine: Engine) -> EPFront | None:
    """Every rank of the job calls this with its Engine (built with the expert-parallel group). Rank 0 gets the
    EPFront to serve with; the other ranks follow rank 0's rounds here until it stops, then get None."""
    group = new_cpu_group()
    stats = gather_to_rank0(engine.stats(), group)
    if dist.get_rank(group) == 0:
        return EPFront(engine, group, stats)
    follow(engine, group)
    return None


class Deltas:
    """Each live request's output so far, on both sides of the wire: a rank cuts each output down to what is new
    since that request's previous one; rank 0 joins the pieces back into the engine's whole output."""

    def __init__(self):
        self.seen: dict[str, RequestOutput] = {}

    def cut(self, out: RequestOutput) -> RequestOutput:
        before = self.seen.pop(out.request_id, None)
        if not out.finished:
            self.seen[out.request_id] = out
        if before is None:
            return dataclasses.replace(out, prompt_token_ids=[])  # rank 0 has them
        return dataclasses.replace(
            out, prompt_token_ids=[], token_ids=out.token_ids[len(before.token_ids) :], text=out.text[len(before.text) :],
            logprobs=None if out.logprobs is None else out.logprobs[len(before.logprobs) :], prompt_logprobs=None,
        )

    def join(self, piece: RequestOutput, prompt_token_ids: list[int]) -> RequestOutput:
        before = self.seen.pop(piece.request_id, None)
        out = dataclasses.replace(piece, prompt_token_ids=prompt_token_ids)
        if before is not None:
            out = dataclasses.replace(
                out, token_ids=before.token_ids + piece.token_ids, text=before.text + piece.text, prompt_logprobs=before.prompt_logprobs,
                logprobs=None if piece.logprobs is None else before.logprobs + piece.logprobs,
            )
        if not out.finished:
            self.seen[out.request_id] = out
        return out


def follow(engine: Engine, group: ProcessGroup) -> None:
    """A worker rank: take rank 0's commands, step, report; until rank 0 sends the stop."""
    deltas = Deltas()
    while (commands := scatter(None, group)) is not None:
        gather_to_rank0(round_trip(engine, commands, deltas), group)


def round_trip(engine: Engine, commands: list[tuple], deltas: Deltas) -> Report:
    """Apply this rank's commands and step (with every other rank) -> what rank 0 needs."""
    refused = []
    for command in commands:
        if command[0] == "abort":
            engine.abort_request(command[1])
            continue
        _, request_id, prompt_ids, params = command
        try:
            engine.add_request(prompt_ids, params, request_id)
        except ValueError as e:
            refused.append((request_id, str(e)))
    outputs = [deltas.cut(out) for out in engine.step()]
    return Report(outputs, refused, engine.stats())


class EPFront:
    """The Engine's interface (add_request, abort_request, step, has_unfinished_requests, stats, close) over every
    rank's Engine, for rank 0's EngineLoop. rank_stats holds each rank's EngineStats after the last round."""

    def __init__(self, engine: Engine, group: ProcessGroup, rank_stats: list[EngineStats]):
        self.engine, self.group, self.rank_stats = engine, group, rank_stats
        self.commands: list[list[tuple]] = [[] for _ in rank_stats]  # per rank, sent with the next round
        self.live: dict[str, tuple[int, list[int]]] = {}  # request_id -> (its rank, its prompt ids), until it finishes
        self.sent, self.received = Deltas(), Deltas()  # rank 0's own engine's cut, and every rank's pieces joined

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str) -> str:
        """Queue the request for the rank with the fewest live requests (the lowest such rank)."""
        if request_id in self.live:
            raise ValueError(f"request_id {request_id!r} is already in use")
        load = [0] * len(self.rank_stats)
        for rank, _ in self.live.values():
            load[rank] += 1
        rank = load.index(min(load))
        self.commands[rank].append(("add", request_id, list(prompt_token_ids), params))
        self.live[request_id] = (rank, list(prompt_token_ids))
        return request_id

    def abort_request(self, request_id: str) -> None:
        if request_id in self.live:
            self.commands[self.live[request_id][0]].append(("abort", request_id))

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    def step(self) -> list[RequestOutput | Refused]:
        """One round on every rank -> every rank's outputs, and a Refused for each request a rank's engine refused."""
        commands, self.commands = self.commands, [[] for _ in self.rank_stats]
        reports = gather_to_rank0(round_trip(self.engine, scatter(commands, self.group), self.sent), self.group)
        results: list[RequestOutput | Refused] = []
        for rank, report in enumerate(reports):
            self.rank_stats[rank] = report.stats
            for request_id, why in report.refused:
                del self.live[request_id]
                results.append(Refused(request_id, ValueError(why)))
            for out in report.outputs:
                _, prompt = self.live.pop(out.request_id) if out.finished else self.live[out.request_id]
                results.append(self.received.join(out, prompt))
        return results

    def stats(self) -> EngineStats:
        """The ranks' EngineStats summed (requests, cache blocks, tokens: the whole server's)."""
        return EngineStats(*(sum(getattr(s, f.name) for s in self.rank_stats) for f in dataclasses.fields(EngineStats)))

    def close(self) -> None:
        """End every other rank's `follow` (the EngineLoop calls this when it stops)."""
        scatter([None] * len(self.rank_stats), self.group)


def scatter(per_rank: list | None, group: ProcessGroup):
    """Rank 0's per_rank[r] on each rank r (others pass None)."""
    out = [None]
    dist.scatter_object_list(out, per_rank, group_src=0, group=group)
    return out[0]

