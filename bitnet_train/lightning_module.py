"""LightningModule around BitNetModel: loss, the two-stage schedule, lambda warm-up, NaN guard."""

from __future__ import annotations

import math

import lightning as L
import torch

from .cli_errors import EXIT_RUN_FAILED
from .errors import BitNetError
from .model import BitNetModel, ModelConfig, QuantConfig
from .quant import lambda_at, set_model_act_quant, set_model_lambda
from .schedule import OptimConfig, lr_multiplier, weight_decay_at


class NonFiniteLossError(BitNetError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""

    exit_code = EXIT_RUN_FAILED  # a failed run, not a bad command line


class BitNetLM(L.LightningModule):
    def __init__(self, model: dict, quant: dict, optim: dict, total_steps: int):
        super().__init__()
        # The architecture is saved in every checkpoint and restored from it.
        self.save_hyperparameters()
        self.model = BitNetModel(ModelConfig.from_dict(model), QuantConfig.from_dict(quant))
        self.optim_cfg = OptimConfig.from_dict(optim)
        self.total_steps = total_steps
        self.grad_clip: float | None = None  # max global grad norm (trainer.gradient_clip_val)

    # -- steps ---------------------------------------------------------------------------------
    def on_train_batch_start(self, batch, batch_idx):
        step = self.global_step
        q = self.model.quant_config
        if q.method != "none":
            set_model_lambda(self.model, lambda_at(step, q.lambda_warmup_steps, q.lambda_schedule))
            set_model_act_quant(self.model, step >= q.act_quant_from_step)
        wd = weight_decay_at(step, self.total_steps, self.optim_cfg)
        for group in self.optimizers().param_groups:
            if group.get("decay", False):
                group["weight_decay"] = wd

    def training_step(self, batch, batch_idx):
        x, y = batch  # (B, T) input ids, (B, T) targets
        loss = self.training_loss(x, y)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"training loss became {loss.item()} at step {self.global_step}; stopped. "
                f"The last good checkpoint is kept (lower optim.lr or use precision=32-true)."
            )
        lam = self._current_lambda()
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"])
        self.log("train/lambda", lam)
        self.log("train/tokens", float((self.global_step + 1) * x.numel() * self.trainer.world_size
                                       * self.trainer.accumulate_grad_batches), reduce_fx="max")
        return loss

    def training_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The loss minimised (subclasses add terms: distill.DistillLM); validation stays plain CE."""
        return self.model.loss(x, y)

    def on_before_optimizer_step(self, optimizer):
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        if grads:
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
            if not torch.isfinite(norm):
                raise NonFiniteLossError(
                    f"gradient norm became {norm.item()} at step {self.global_step}; stopped. "
                    f"The last good checkpoint is kept."
                )
            self.log("train/grad_norm", norm)
            if self.grad_clip:  # as Lightning's gradient_clip_val (norm): scale every grad by clip / norm
                torch.nn.utils.clip_grads_with_norm_([p for p in self.parameters() if p.grad is not None],
                                                     self.grad_clip, norm)

    # validation dataloader index -> metric prefix: the validation split, then the held-out general
    # English set when the data module has one (data.TextDataModule.val_dataloader)
    VAL_PREFIXES = ("val", "val_general")

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        loss = self.model.loss(x, y)
        prefix = self.VAL_PREFIXES[dataloader_idx]
        self.log(f"{prefix}/loss", loss, prog_bar=True, sync_dist=True, add_dataloader_idx=False)
        return loss

    def on_validation_epoch_end(self):
        for prefix in self.VAL_PREFIXES:
            loss = self.trainer.callback_metrics.get(f"{prefix}/loss")
            if loss is not None:
                self.log(f"{prefix}/ppl", math.exp(min(float(loss), 50.0)), sync_dist=True)

    def _current_lambda(self) -> float:
        for m in self.model.bitlinear_modules().values():
            if m.quantize:
                return float(m.lam)
        return 1.0

    # -- optimizer -----------------------------------------------------------------------------
    def configure_optimizers(self):
        cfg = self.optim_cfg
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            # weight decay on matrices only (not norms); embeddings count as matrices here
            (decay if p.dim() >= 2 else no_decay).append(p)
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay, "decay": True},
                {"params": no_decay, "weight_decay": 0.0, "decay": False},
            ],
            lr=cfg.lr,
            betas=cfg.betas,
            eps=cfg.eps,
            # one fused kernel per parameter instead of a dozen elementwise passes: the for-loop
            # AdamW took 0.7 s of a 3.1 s CPU step at SmolLM2 width (bench/README.md)
            fused=fused_adamw_ok(decay + no_decay),
        )
        total = self.total_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_multiplier(step, total, cfg))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def fused_adamw_ok(params) -> bool:
    """torch's fused AdamW runs on CPU and CUDA floating-point parameters, all on one device type."""
    kinds = {(p.device.type, p.dtype) for p in params}
    return bool(kinds) and all(dev in ("cpu", "cuda") and dt.is_floating_point for dev, dt in kinds) \
        and len({dev for dev, _ in kinds}) == 1
