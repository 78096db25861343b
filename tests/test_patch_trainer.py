"""A patched model trains with transformers' Trainer and padding-free packing (DataCollatorWithFlattening): the
same steps on the unpatched model (each document run on its own, as its attention cannot see the document
boundaries) give the same losses and the same trained weights."""
import copy

import pytest
import torch
from conftest import assert_close

transformers = pytest.importorskip("transformers")
from internlm_kernels.integrations import transformers as ik_hf  # noqa: E402

VOCAB = 64


class _SeparateDocuments(torch.nn.Module):
    """The unpatched model's loss over a flattened batch, one document at a time: Σ_docs (loss_i · n_i) / Σ n_i."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels, position_ids, **_):
        starts = (position_ids[0] == 0).nonzero().flatten().tolist() + [input_ids.shape[1]]
        losses, counts = [], []
        for a, b in zip(starts[:-1], starts[1:]):
            ids = input_ids[:, a:b]
            losses.append(self.model(input_ids=ids, labels=labels[:, a:b]).loss)
            counts.append((labels[:, a + 1:b] != -100).sum())
        counts = torch.stack(counts)
        return {"loss": (torch.stack(losses) * counts).sum() / counts.sum()}


def _train(model, data, out_dir):
    args = transformers.TrainingArguments(output_dir=str(out_dir), max_steps=2, per_device_train_batch_size=3,
                                          learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no",
                                          use_cpu=True, seed=0, data_seed=0, disable_tqdm=True,
                                          dataloader_num_workers=0, lr_scheduler_type="constant")
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   data_collator=transformers.DataCollatorWithFlattening())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trainer_step_with_padding_free_packing(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM._from_config(config, attn_implementation="eager")
    ours = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(4, 12, (9,), generator=g)]
    data = [{"input_ids": d, "labels": d} for d in docs]

    want = _train(_SeparateDocuments(ref), data, tmp_path / "ref")
    try:
        ik_hf.patch(ours)
        got = _train(ours, data, tmp_path / "ours")
    finally:
        ik_hf.unpatch()
    assert len(got) == 2 and all(torch.isfinite(torch.tensor(got)))
    assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters()):
        assert_close(p, q, rtol=1e-4, atol=1e-4, msg=name)
