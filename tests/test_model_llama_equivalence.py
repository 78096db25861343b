"""The independent check: a random InternLM2 converted to the Llama layout computes the same logits in
transformers' own LlamaForCausalLM (fp32), for single sequences and right-padded batches, with every RoPE variant."""
import dataclasses

import pytest
import torch
from conftest import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from models import InternLM2Config, InternLM2ForCausalLM
from models.checkpoint import llama_config_dict, to_llama_state_dict

SCALINGS = [None, {"type": "linear", "factor": 2.0}, {"type": "dynamic", "factor": 2.0}]


def pair(scaling, seed=0):
    torch.manual_seed(seed)
    cfg = dataclasses.replace(InternLM2Config.preset("micro"), rope_scaling=scaling)
    ours = InternLM2ForCausalLM(cfg).eval()
    llama = LlamaForCausalLM(LlamaConfig.from_dict(llama_config_dict(cfg), attn_implementation="eager")).eval()
    llama.load_state_dict(to_llama_state_dict(ours.state_dict(), cfg), strict=True)
    return ours, llama


@pytest.mark.parametrize("scaling", SCALINGS, ids=["plain", "linear", "dynamic"])
def test_single_sequence_logits_match_transformers(scaling):
    ours, llama = pair(scaling)
    # 80 tokens > max_position_embeddings (64): dynamic NTK raises the base in both models.
    ids = torch.randint(0, 101, (1, 80))
    with torch.no_grad():
        want = llama(input_ids=ids).logits
        assert_close(ours(ids[0]).logits, want[0])
        assert_close(ours(ids).logits, want)


@pytest.mark.parametrize("scaling", SCALINGS, ids=["plain", "linear", "dynamic"])
def test_right_padded_batch_logits_match_transformers(scaling):
    ours, llama = pair(scaling, seed=1)
    lengths = [70, 23, 1, 49]                    # the longest row is full, so both models see the same NTK length
    S = max(lengths)
    ids = torch.randint(0, 101, (len(lengths), S))
    mask = (torch.arange(S)[None, :] < torch.tensor(lengths)[:, None]).long()
    with torch.no_grad():
        want = llama(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask).logits
    valid = mask.bool()
    assert_close(got[valid], want[valid])


def test_loss_matches_transformers():
    ours, llama = pair(None, seed=2)
    ids = torch.randint(0, 101, (2, 30))
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        assert_close(ours(ids, labels=labels).loss, llama(input_ids=ids, labels=labels).loss)
