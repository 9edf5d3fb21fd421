"""DeepEP LL argument checks and the dispatcher factory: no GPU, no deep_ep needed."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from dsr1.config import ModelConfig
from dsr1.parallel.deepep import check_low_latency_args, check_top_k
from dsr1.engine.load import make_dispatcher
from dsr1.model.dispatch import LocalDispatcher
from dsr1.parallel.placement import expert_placement

REPO = Path(__file__).resolve().parents[2]


def refusal(**args) -> str | None:
    """check_low_latency_args' error message, or None if it accepts the arguments."""
    try:
        check_low_latency_args(**args)
    except ValueError as e:
        return str(e)
    return None


def test_r1_shapes_pass():
    """R1's own config (configs/deepseek-r1.json) passes at every power-of-two EP size, BF16 or FP8 dispatch;
    only an EP size that does not divide its 256 experts (3 here) is refused."""
    cfg = ModelConfig.from_file(REPO / "configs" / "deepseek-r1.json")
    assert (cfg.dim, cfg.n_routed_experts, cfg.n_activated_experts) == (7168, 256, 8)
    verdicts = {
        (ep_size, fp8): refusal(hidden=cfg.dim, n_experts=cfg.n_routed_experts, ep_size=ep_size, max_tokens=128, fp8_dispatch=fp8)
        for ep_size in (1, 2, 3, 4, 8, 16, 32, 64, 128, 256)
        for fp8 in (False, True)
    }
    refused = {key: msg for key, msg in verdicts.items() if msg is not None}
    assert set(refused) == {(3, False), (3, True)}, refused
    assert all("got 256 % 3" in msg for msg in refused.values())
    assert check_top_k(cfg.n_activated_experts) is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden=192), r"hidden sizes \(2048, .*8192\), got hidden=192; use --all2all torch"),
        (dict(n_experts=10, ep_size=4), r"n_routed_experts % ep_size == 0, got 10 % 4"),
        (dict(hidden=192, fp8_dispatch=True), r"FP8 dispatch needs hidden % 512 == 0, got hidden=192; dispatch in BF16"),
        (dict(ep_size=2, max_tokens=3), r"ep_size \* max_tokens_per_rank % 4 == 0, got 2 \* 3"),
    ],
)
def test_low_latency_arg_errors(kwargs, match):
    args = dict(hidden=7168, n_experts=256, ep_size=8, max_tokens=128, fp8_dispatch=False) | kwargs
    with pytest.raises(ValueError, match=match):
        check_low_latency_args(**args)


def test_top_k_limit():
    check_top_k(11)
    with pytest.raises(ValueError, match=r"at most 11 experts per token, got top-k=12"):
        check_top_k(12)


def test_missing_deep_ep_says_how_to_build(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # makes `import deep_ep` raise ImportError
    with pytest.raises(ImportError, match=r"import deep_ep.*DeepEP.*567632d.*nvidia-nvshmem-cu13.*--all2all torch"):
        make_dispatcher("deepep_ll", expert_placement(256, 8, 0, "round_robin"), None, 128, 7168)


def test_deepep_checks_run_before_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)
    with pytest.raises(ValueError, match=r"got hidden=192"):
        make_dispatcher("deepep_ll", expert_placement(16, 2, 0, "linear"), None, 128, 192)


def test_factory():
    single = expert_placement(16, 1, 0, "round_robin")
    for all2all in ("local", "torch", "deepep_ll"):
        d = make_dispatcher(all2all, single, None, 32, 192)
        assert isinstance(d, LocalDispatcher) and d.local_expert_ids == list(range(16)) and d.max_tokens == 32
    two = expert_placement(16, 2, 0, "linear")
    with pytest.raises(ValueError, match=r"--all2all='nccl' is not one of \('local', 'torch', 'deepep_ll'\)"):
        make_dispatcher("nccl", two, None, 128, 192)
    with pytest.raises(ValueError, match=r"--all2all local holds all experts in one process, but ep_size=2"):
        make_dispatcher("local", two, None, 128, 192)
    with pytest.raises(ValueError, match=r"FP8 dispatch needs --all2all deepep_ll, got --all2all torch"):
        make_dispatcher("torch", two, None, 128, 192, fp8_dispatch=True)
