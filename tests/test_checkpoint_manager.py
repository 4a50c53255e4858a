"""nanochat.checkpoint_manager: round trip, atomic saves, default tag / step choice, helpful errors."""

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from nanochat import checkpoint_manager as cm
from nanochat.gpt import GPT, GPTConfig
from nanochat.tokenizer import Tokenizer


@pytest.fixture
def base_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOCHAT_BASE_DIR", str(tmp_path))
    return tmp_path


def tiny_model(depth: int = 1, vocab_size: int = 300) -> GPT:
    torch.manual_seed(depth)
    return GPT(GPTConfig.from_depth(depth, vocab_size=vocab_size, sequence_len=16, head_dim=32))


def trained_optimizers(model: GPT):
    """Optimizers with real state (one step taken), so their state dicts are worth comparing."""
    optimizers = model.setup_optimizers()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    model(x, x).backward()
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)
    return optimizers


def save(directory, step, model, optimizers=None, **meta):
    meta = {"step": step, "model_config": dataclasses.asdict(model.config), **meta}
    states = None if optimizers is None else [opt.state_dict() for opt in optimizers]
    cm.save_checkpoint(str(directory), step, model.state_dict(), states, meta, aux_states={"gist": {"w": torch.ones(2)}})


def test_round_trip_restores_weights_optimizers_meta_and_aux(tmp_path):
    model = tiny_model()
    optimizers = trained_optimizers(model)
    save(tmp_path, 7, model, optimizers, val_bpb=1.5, dataloader_state={"slots": [{"epoch": 0}]})
    assert sorted(os.listdir(tmp_path)) == ["meta_000007.json", "model_000007.pt", "optim_000007_rank0.pt"]
    model_state, optim_states, meta, aux = cm.load_checkpoint(str(tmp_path), 7, "cpu", load_optimizer=True)
    assert meta["val_bpb"] == 1.5 and meta["dataloader_state"] == {"slots": [{"epoch": 0}]}
    assert torch.equal(aux["gist"]["w"], torch.ones(2))
    restored = cm.build_model(model_state, meta, "cpu", phase="eval")
    assert not restored.training
    x = torch.randint(0, 300, (1, 16))
    assert torch.equal(restored(x), model(x))
    fresh = tiny_model().setup_optimizers()
    for opt, state in zip(fresh, optim_states):
        opt.load_state_dict(state)
    for opt, original in zip(fresh, optimizers):
        for p_new, p_old in zip(opt.state.values(), original.state.values()):
            assert all(torch.equal(p_new[k], p_old[k]) for k in p_old if torch.is_tensor(p_old[k]))


def test_compiled_model_keys_are_accepted(tmp_path):
    model = tiny_model()
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}
    cm.save_checkpoint(str(tmp_path), 1, state, None, {"step": 1, "model_config": dataclasses.asdict(model.config)})
    model_state, _, meta, _ = cm.load_checkpoint(str(tmp_path), 1, "cpu")
    cm.build_model(model_state, meta, "cpu", "train")


@pytest.mark.parametrize("fail_on", ["optimizer", "meta"])
def test_crash_mid_save_leaves_no_half_step(tmp_path, monkeypatch, fail_on):
    model = tiny_model()
    optimizers = trained_optimizers(model)
    save(tmp_path, 1, model, optimizers)
    real_save = torch.save

    def exploding_save(obj, f, *args, **kwargs):
        if isinstance(obj, list):  # the optimizer shard
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *args, **kwargs)

    def exploding_dumps(*args, **kwargs):
        raise OSError("killed (simulated)")

    if fail_on == "optimizer":
        monkeypatch.setattr(cm.torch, "save", exploding_save)
    else:
        monkeypatch.setattr(cm.json, "dumps", exploding_dumps)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 2, model, optimizers)
    monkeypatch.undo()
    assert cm.list_steps(str(tmp_path)) == [1]
    assert cm.find_last_step(str(tmp_path)) == 1
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # no temp file left behind
    with pytest.raises(FileNotFoundError, match="saved steps: \\[1\\]"):
        cm.load_checkpoint(str(tmp_path), 2, "cpu")


def test_latest_tag_and_step_are_the_defaults(base_dir):
    root = base_dir / "base_checkpoints"
    for tag, depth, steps in [("d1", 1, [5, 20]), ("d2", 2, [3, 10]), ("custom", 1, [99])]:
        for step in steps:
            save(root / tag, step, tiny_model(depth))
    (root / "d9").mkdir()  # a crashed first save: no meta, so it does not count
    (root / "d9" / "model_000001.pt").write_bytes(b"partial")
    assert cm.find_largest_model(str(root)) == "d2"
    assert cm.resolve_checkpoint("base") == (str(root / "d2"), 10)
    assert cm.resolve_checkpoint("base", model_tag="d1") == (str(root / "d1"), 20)
    assert cm.resolve_checkpoint("base", model_tag="d1", step=5) == (str(root / "d1"), 5)


def test_load_model_builds_the_saved_model_with_the_tokenizer(base_dir):
    trained = Tokenizer.train_from_iterator(iter(["the cat sat on the mat"] * 20), 280)
    trained.save(str(base_dir / "tokenizer"))
    model = tiny_model(2)
    save(base_dir / "mid_checkpoints" / "d2", 4, model)
    loaded, tokenizer, meta = cm.load_model("mid", "cpu", phase="eval")
    assert meta["step"] == 4 and tokenizer.mergeable_ranks == trained.mergeable_ranks
    x = torch.randint(0, 300, (1, 8))
    assert torch.equal(loaded(x), model(x))


@pytest.mark.parametrize("source,command", [("base", "python -m scripts.base_train"),
                                            ("mid", "python -m scripts.mid_train"),
                                            ("sft", "python -m scripts.chat_sft")])
def test_missing_checkpoints_name_the_command(base_dir, source, command):
    with pytest.raises(FileNotFoundError, match=command):
        cm.load_model(source, "cpu")
    os.makedirs(base_dir / cm.PHASE_DIRS[source] / "d3")  # a directory without any complete step
    with pytest.raises(FileNotFoundError, match=command):
        cm.load_model(source, "cpu")
    with pytest.raises(FileNotFoundError, match="d7"):
        cm.load_model(source, "cpu", model_tag="d7")


def test_missing_optimizer_shard_explains_world_size(tmp_path):
    model = tiny_model()
    cm.save_checkpoint(str(tmp_path), 3, model.state_dict(), None,
                       {"step": 3, "model_config": dataclasses.asdict(model.config), "world_size": 2})
    with pytest.raises(FileNotFoundError, match="world_size=2"):
        cm.load_checkpoint(str(tmp_path), 3, "cpu", load_optimizer=True, rank=1)


def test_loading_does_not_import_the_compiler_stack(base_dir):
    """Model loading stays off torch._dynamo / sympy (seconds of imports before a one-shot chat_cli reply)."""
    save(base_dir / "sft_checkpoints" / "d1", 1, tiny_model(1))
    code = ("import sys, torch\nfrom nanochat.checkpoint_manager import build_model, load_checkpoint\n"
            f"state, _, meta, _ = load_checkpoint({str(base_dir / 'sft_checkpoints' / 'd1')!r}, 1, 'cpu')\n"
            "model = build_model(state, meta, 'cpu', 'eval')\nmodel(torch.zeros(1, 4, dtype=torch.long))\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=root,
                            env={**os.environ, "PYTHONPATH": root})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_built_model_has_the_saved_weights_and_trains(base_dir):
    model = tiny_model(1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    built = cm.build_model(state, {"model_config": dataclasses.asdict(model.config)}, "cpu", "train")
    assert built.training and all(p.requires_grad for p in built.parameters())
    assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), model.state_dict().values()))
    assert torch.equal(built.rotary_cos, model.rotary_cos) and torch.equal(built.rotary_sin, model.rotary_sin)
    fresh = GPT(model.config)  # outside build_model the initialisers run as usual
    assert fresh.transformer.wte.weight.std() > 0.5 and torch.count_nonzero(fresh.lm_head.weight) > 0
