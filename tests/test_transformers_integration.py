"""attn_implementation="internlm_kernels" in a tiny random Hugging Face Llama, against transformers' own sdpa.

The Triton kernels run (under the interpreter on CPU). Packed documents (position_ids restarting at 0) must give
the logits and the parameter gradients of running each document on its own; padded batches and plain batches must
match sdpa with the same inputs.
"""
import copy

import pytest
import torch
from conftest import assert_close

import internlm_kernels as ik

transformers = pytest.importorskip("transformers")
from internlm_kernels.integrations import transformers as ik_hf  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def tiny_llama_pair():
    """Two Llamas with the same random weights: ours and transformers' sdpa."""
    ik_hf.register()
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ours = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config),
                                                      attn_implementation="internlm_kernels").to(DEVICE)
    sdpa = transformers.LlamaForCausalLM._from_config(copy.deepcopy(config), attn_implementation="sdpa").to(DEVICE)
    sdpa.load_state_dict(ours.state_dict())
    assert ours.config._attn_implementation == "internlm_kernels"
    return ours, sdpa


def grads_of(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_packed_documents_match_separate_sdpa_runs():
    ours, sdpa = tiny_llama_pair()
    lens = [5, 11, 8]
    ids = torch.randint(0, 64, (1, sum(lens)), device=DEVICE)
    position_ids = torch.cat([torch.arange(n, device=DEVICE) for n in lens])[None]
    with ik.use_backend("triton"):
        logits = ours(input_ids=ids, position_ids=position_ids).logits
        got_grads = grads_of(ours, logits.square().sum())

    want, start = [], 0
    for n in lens:
        want.append(sdpa(input_ids=ids[:, start:start + n]).logits)
        start += n
    want = torch.cat(want, dim=1)
    want_grads = grads_of(sdpa, want.square().sum())
    assert_close(logits, want)
    for name, g in got_grads.items():
        assert_close(g, want_grads[name], rtol=1e-4, atol=1e-4, msg=name)

    # The same documents given as flash-attention kwargs (cu_seq_lens), with positions that do not restart: RoPE is
    # relative, so only the document boundaries from cu_seq_lens keep the logits equal.
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32, device=DEVICE)
    with torch.no_grad(), ik.use_backend("triton"):
        via_cu = ours(input_ids=ids, position_ids=torch.arange(24, device=DEVICE)[None], cu_seq_lens_q=cu,
                      cu_seq_lens_k=cu, max_length_q=11, max_length_k=11).logits
    assert_close(via_cu, want)


def test_padded_batch_and_plain_batch_match_sdpa():
    ours, sdpa = tiny_llama_pair()
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    with torch.no_grad():
        with ik.use_backend("triton"):
            got_padded = ours(input_ids=ids, attention_mask=mask).logits
            got_plain = ours(input_ids=ids).logits
        want_padded = sdpa(input_ids=ids, attention_mask=mask).logits
        want_plain = sdpa(input_ids=ids).logits
    valid = mask.bool()
    assert_close(got_padded[valid], want_padded[valid])
    assert_close(got_plain, want_plain)
