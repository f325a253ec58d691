"""The RL training loop: pull episodes, train on trie-packed groups, publish weights.

One step:

1. rank 0 gathers ``batchSize`` episodes in whole GRPO groups from the proxies;
2. the groups are packed (trie or flat) into micro-batches per optimizer update and the
   micro-batches are spread over the ranks; the loss denominators are the step's totals,
   so every rank's gradient is its share of the one flat-batch gradient;
3. old-policy logprobs (when a batch is used for more than one update) and entropies
   (for entropy-aware scaling) come from a no-gradient pass; reference logprobs when a KL
   term is configured;
4. updates: accumulate, clip, AdamW;
5. the new weights reach every rollout replica under the next version, through each
   proxy's Rollout Manager (pause → load → version → resume): exported to disk and
   reloaded (``weightSync`` Disk), or broadcast from rank 0 with vLLM's native NCCL
   transfer (NCCL); see :class:`WeightPublisher`;
6. the step's trees are acknowledged (the proxies delete them), metrics and progress are
   reported, and a checkpoint is written every ``intervalSteps``.

A trainer restarted by the operator resumes from the latest complete checkpoint; trees
of the interrupted step were never acknowledged, so they are delivered again.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from trieflow.proxy.client import ProxyClient
from trieflow.trainer.attention import register_tree_attention
from trieflow.trainer.batching import Update, assign_to_ranks, plan_updates
from trieflow.trainer.checkpoint import CheckpointManager
from trieflow.trainer.distributed import (
    DistEnv,
    clip_grad_norm_,
    distributed_accumulate_gradients,
    distributed_score_batches,
    init_distributed,
    reduce_step_metrics,
    shard_model,
)
from trieflow.trainer.entropy import (
    EntropyScalingConfig,
    entropy_advantage_scale,
    sequence_entropies,
    with_sequence_scale,
)
from trieflow.trainer.episodes import Group, GroupCollector, episode_reward, trajectory_ids
from trieflow.trainer.export import export_hf, hf_tensor_metas, hf_tensors
from trieflow.trainer.forward import TargetLogprobs
from trieflow.trainer.intake import TrajectoryIntake
from trieflow.trainer.metrics import StepMetrics as StepObservation
from trieflow.trainer.metrics import observe_step, start_metrics_server
from trieflow.trainer.packing import PackedBatch
from trieflow.trainer.settings import TrainerSettings, entropy_scaling_config
from trieflow.trainer.step import StepConfig
from trieflow.trainer.weight_sync import DiskWeightSync, NcclWeightSync, WeightSyncError
from trieflow.trainer.weight_transfer import TensorMeta, WeightTransferError

log = logging.getLogger(__name__)


@dataclass
class StepRecord:
    """What one step did; printed as a JSON line and kept for the summary."""

    step: int
    weight_version: int
    episodes: int
    reward_mean: float
    loss: float
    flat_tokens: int
    unique_tokens: int
    grad_norm: float
    step_seconds: float
    sync_seconds: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def dedup_ratio(self) -> float:
        return self.flat_tokens / max(self.unique_tokens, 1)

    def to_json(self) -> str:
        data = {k: v for k, v in vars(self).items() if k != "metrics"}
        data |= {"dedup_ratio": round(self.dedup_ratio, 4), **self.metrics}
        return json.dumps(data, sort_keys=False)


def load_policy(settings: TrainerSettings, device: torch.device) -> Any:
    model: Any = AutoModelForCausalLM.from_pretrained(
        settings.model_dir, dtype=settings.dtype, attn_implementation=register_tree_attention()
    )
    model.to(device)
    model.config.use_cache = False
    if settings.on_gpu:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


#: ``(HF name, tensor)`` of one weight version, a fresh stream per call.
TensorStream = Callable[[], Iterable[tuple[str, torch.Tensor]]]
#: Declares a stream's tensors without gathering them.
TensorMetas = Callable[[], Sequence[TensorMeta]]
#: Builds rank 0's NCCL sync (once, at the first publish) from the settings and the model's
#: tensor stream; tests hand in one whose sender feeds gloo receivers instead of vLLM.
NcclConnect = Callable[[TrainerSettings, TensorStream, TensorMetas], NcclWeightSync]


def connect_nccl(
    settings: TrainerSettings, tensors: TensorStream, metas: TensorMetas
) -> NcclWeightSync:
    """Joins vLLM's native weight transfer on every replica behind the proxies: one NCCL
    rank per GPU of a replica (vLLM's TP x PP x DP workers), every phase with a deadline."""
    if not settings.on_gpu:
        raise WeightSyncError(
            "spec.rollout.weightSync resolves to NCCL (trainer and rollout have GPUs), but this "
            "trainer process has no CUDA device; set weightSync: Disk to train on CPU"
        )
    step = settings.sync_step_timeout
    return NcclWeightSync.connect(
        settings.proxies,
        tensors,
        metas=metas,
        workers_per_replica=settings.job.spec.rollout.effective_gpus_per_replica,
        init_timeout=step,
        step_timeout=step,
        call_timeout=4 * step + 60.0,  # one UpdateWeights: pause, version, resume, slack
    )


class WeightPublisher:
    """Gets each new weight version served by every rollout replica; every rank calls
    :meth:`publish` (the export and the tensor stream gather FSDP shards: collectives).

    * Disk: every rank takes part in :func:`export_hf`; rank 0 has each proxy's Rollout
      Manager reload the folder (:class:`DiskWeightSync`).
    * NCCL: every rank iterates :func:`hf_tensors` in the same order (the same tensors
      the export would write); rank 0 streams them to vLLM through
      :class:`NcclWeightSync`, connected lazily at the first publish, when the replicas
      are up. A failed transfer leaves the NCCL group unusable (a broadcast cannot be
      cancelled), so every rank raises :class:`WeightSyncError` and the trainer stops;
      the operator's restart builds a new group.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        model: torch.nn.Module,
        env: DistEnv,
        *,
        nccl_connect: NcclConnect = connect_nccl,
    ) -> None:
        self.settings = settings
        self.model = model
        self.env = env
        self.method = settings.weight_sync
        self.disk = (
            DiskWeightSync(
                list(settings.proxies),
                root=settings.weights_dir,
                step_timeout=settings.sync_step_timeout,
            )
            if self.method == "Disk"
            else None
        )
        self._nccl_connect = nccl_connect
        self.nccl: NcclWeightSync | None = None
        self._stream: Iterator[tuple[str, torch.Tensor]] | None = None

    def publish(self, version: int) -> float:
        """Serve ``version`` everywhere; returns the seconds it took (on every rank)."""
        started = time.perf_counter()
        if self.disk is not None:
            path = self.disk.prepare(version)
            export_hf(self.model, path, tokenizer_dir=self.settings.model_dir)
            if self.env.rank == 0:
                self.disk.publish(path, version)
        else:
            self._publish_nccl(version)
        if self.env.world_size > 1:
            dist.barrier()
        return time.perf_counter() - started

    def _publish_nccl(self, version: int) -> None:
        stream = hf_tensors(self.model)
        error: Exception | None = None
        if self.env.rank == 0:
            self._stream = stream
            try:
                if self.nccl is None:
                    self.nccl = self._nccl_connect(self.settings, self._take_stream, self._metas)
                self.nccl.sync(version)
            except Exception as exc:  # shared with every rank below, then raised
                error = exc
            finally:
                self._stream = None
        for _ in stream:  # what rank 0 did not send (all of it elsewhere): the gathers
            pass
        failure = self._share(None if error is None else self._explain(error))
        if failure is None:
            return
        if self.env.rank == 0:
            self.close()
        message = f"weight version {version} not published over NCCL: {failure}"
        raise WeightSyncError(message) from error

    def _explain(self, error: Exception) -> str:
        """Rank 0's account of a failed publish, with what it leaves behind."""
        text = _describe(error)
        if self.nccl is None:
            return f"{text}. The NCCL transfer group did not form; the trainer stops."
        if self.nccl.sender.broken is not None:
            return (
                f"{text}. The NCCL transfer group is unusable now (a broadcast cannot be "
                "cancelled): the trainer stops, and its restart rebuilds the group; restart "
                "rollout replicas that stay stuck in the transfer."
            )
        return f"{text}. The transfer itself completed; the trainer stops."

    def _take_stream(self) -> Iterator[tuple[str, torch.Tensor]]:
        """This round's stream: created by :meth:`_publish_nccl` so it can finish the gathers
        itself when the transfer stops early."""
        if self._stream is None:
            raise RuntimeError("the NCCL sync asked for tensors outside a publish")
        return self._stream

    def _metas(self) -> list[TensorMeta]:
        return hf_tensor_metas(self.model)

    def _share(self, failure: str | None) -> str | None:
        """Rank 0's outcome, on every rank (one broadcast)."""
        if self.env.world_size == 1:
            return failure
        box = [failure]
        dist.broadcast_object_list(box, src=0)
        result: str | None = box[0]
        return result

    def close(self) -> None:
        if self.nccl is not None:
            try:
                self.nccl.close()
            except Exception as exc:  # closing must not hide why the trainer stops
                log.warning("closing the NCCL weight sync failed: %s", exc)
            self.nccl = None


class Trainer:
    def __init__(
        self, settings: TrainerSettings, *, nccl_connect: NcclConnect = connect_nccl
    ) -> None:
        self.settings = settings
        self.env = DistEnv.from_env()
        self.main = self.env.rank == 0
        self.config: StepConfig = settings.step_config()
        self.records: list[StepRecord] = []
        self._nccl_connect = nccl_connect

    # -- set-up -------------------------------------------------------------------------

    def _setup(self) -> None:
        s = self.settings
        self.mesh = init_distributed(self.env)
        self.device = torch.device(f"cuda:{self.env.local_rank}" if s.on_gpu else "cpu")
        model = load_policy(s, self.device)
        if self.env.world_size > 1:
            model = shard_model(model, self.mesh)
        self.model = model
        self.optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=s.algorithm.learning_rate,
            weight_decay=0.0,
            fused=s.on_gpu,
        )
        self.reference = self._load_reference() if s.algorithm.kl_coef > 0 else None
        self.checkpoints = CheckpointManager(s.checkpoint_dir, s.job.spec.trainer.checkpoint.keep)
        self.step, self.version = 0, 0
        if self.checkpoints.latest() is not None:
            self.step, extra = self.checkpoints.load(self.model, self.optimizer)
            self.version = int(extra.get("weight_version", self.step))
            log.info("resumed from checkpoint step %d (weight version %d)", self.step, self.version)
        if s.metrics_port is not None:
            self.metrics_port = start_metrics_server(s.metrics_port)
        self.publisher = WeightPublisher(s, self.model, self.env, nccl_connect=self._nccl_connect)
        self.intake = (
            TrajectoryIntake(
                s.proxies, max_unacked=2 * s.algorithm.batch_size, consumer_id=self._consumer()
            ).start()
            if self.main
            else None
        )
        self.collector = GroupCollector(s.algorithm.group_size, timeout=s.group_timeout)
        self.progress = _progress_reporter(s) if self.main else None

    def _served_version(self) -> int:
        """The highest weight version any proxy's replicas serve (proxies that are not up
        yet, e.g. sandboxes still starting, are waited for up to the sync deadline)."""
        deadline = time.monotonic() + self.settings.sync_step_timeout
        versions = []
        for proxy in self.settings.proxies:
            with ProxyClient(proxy, timeout=30.0) as client:
                while True:
                    try:
                        versions.append(int(client.status().weight_version))
                        break
                    except grpc.RpcError as err:
                        if time.monotonic() > deadline:
                            raise RuntimeError(f"proxy {proxy} unreachable: {err}") from err
                        time.sleep(1.0)
        return max(versions, default=0)

    def _consumer(self) -> str:
        return f"{self.settings.job.metadata.name}-trainer"

    def _load_reference(self) -> Any:
        s = self.settings
        name = s.job.spec.model.reference
        path = s.model_dir if name is None else s.model_dir.parent / name
        model: Any = AutoModelForCausalLM.from_pretrained(
            path, dtype=s.dtype, attn_implementation=register_tree_attention()
        )
        model.to(self.device).eval().requires_grad_(False)
        return model

    # -- the loop -----------------------------------------------------------------------

    def run(self) -> list[StepRecord]:
        self._setup()
        try:
            # A restarted trainer meets engines that serve the base weights (they restarted
            # too) or newer ones than its checkpoint (only the trainer restarted): either
            # way it republishes its own weights, under a version above everything served.
            served = self._broadcast(self._served_version() if self.main else None)
            if self.step > 0 or served > self.version:
                self.version = max(self.version, served) + 1
                self._publish()
            total = self.settings.algorithm.total_steps
            while self.step < total:
                self._train_step()
                if self.step % self.settings.job.spec.trainer.checkpoint.interval_steps == 0:
                    self._checkpoint()
            if not self.records or self.records[-1].step != self._last_checkpoint:
                self._checkpoint()
        finally:
            if self.intake is not None:
                self.intake.stop()
            self.publisher.close()
            if dist.is_initialized():
                dist.destroy_process_group()
        return self.records

    _last_checkpoint = -1

    def _train_step(self) -> None:
        s = self.settings
        started = time.perf_counter()
        groups = self._gather_groups() if self.main else None
        plan = self._broadcast(
            None
            if groups is None
            else (
                plan_updates(
                    groups,
                    mini_batch_size=s.algorithm.mini_batch_size,
                    micro_batch_tokens=s.algorithm.trie_packing.micro_batch_tokens,
                    trie_packing=s.algorithm.trie_packing.enabled,
                    pad_multiple=s.pad_multiple,
                    pruning_budget=(
                        s.algorithm.pruning.token_budget if s.algorithm.pruning.enabled else None
                    ),
                ),
                [episode_reward(t) for g in groups for t in g.trajectories],
            )
        )
        updates, rewards = plan
        losses, norms = [], []
        metric_sums: dict[str, float] = {}
        for _ in range(s.algorithm.update_epochs):
            for update in updates:
                loss, norm, metrics = self._update(update, scored=len(updates) > 1)
                losses.append(loss)
                norms.append(norm)
                for key, value in metrics.items():
                    metric_sums[key] = metric_sums.get(key, 0.0) + value / len(updates)
        self.step += 1
        self.version += 1
        sync_seconds = self._publish()
        if groups is not None and self.intake is not None:
            ids = trajectory_ids(groups)
            self.intake.ack(ids)
            self.collector.forget(ids)
        record = StepRecord(
            step=self.step,
            weight_version=self.version,
            episodes=len(rewards),
            reward_mean=statistics.fmean(rewards) if rewards else 0.0,
            loss=statistics.fmean(losses) if losses else 0.0,
            flat_tokens=sum(u.flat_tokens for u in updates),
            unique_tokens=sum(u.unique_tokens for u in updates),
            grad_norm=max(norms) if norms else 0.0,
            step_seconds=time.perf_counter() - started,
            sync_seconds=sync_seconds,
            metrics={k: round(v, 6) for k, v in metric_sums.items()},
        )
        self.records.append(record)
        if self.main:
            print(record.to_json(), flush=True)
            observe_step(_observation(record))
            if self.progress is not None:
                self.progress(record)

    def _gather_groups(self) -> list[Group]:
        """Block until ``batchSize`` episodes in complete groups are ready."""
        assert self.intake is not None
        wanted = self.settings.algorithm.batch_size
        last_note = time.monotonic()
        while self.collector.ready_episodes < wanted:
            delivery = self.intake.get(timeout=1.0)
            if delivery is not None:
                self.collector.add(delivery.trajectory)
            self.collector.expire()
            discarded = self.collector.take_discarded()
            if discarded:
                self.intake.ack(discarded)
            if time.monotonic() - last_note > 30:
                log.info(
                    "waiting for episodes: %d of %d ready", self.collector.ready_episodes, wanted
                )
                last_note = time.monotonic()
        return self.collector.take(wanted)

    def _update(self, update: Update, *, scored: bool) -> tuple[float, float, dict[str, float]]:
        """One optimizer update over this rank's share of the update's micro-batches."""
        s = self.settings
        mine = [update.batches[i].to(self.device) for i in self._my_share(update.batches)]
        entropy = entropy_scaling_config(s.algorithm.entropy_advantage)
        old = None
        mean_entropy: float | None = None
        if scored or entropy.enabled:
            self.model.eval()
            scores = distributed_score_batches(
                self.model, mine, self.config, with_entropy=entropy.enabled
            )
            self.model.train()
            old = [sc.logprobs for sc in scores]
            if entropy.enabled:
                mine, mean_entropy = self._entropy_scaled(update, mine, scores, entropy)
        ref = None
        if self.reference is not None:
            ref_scores = distributed_score_batches(
                self.reference, mine, self.config, with_entropy=False
            )
            ref = [sc.logprobs for sc in ref_scores]
        self.optimizer.zero_grad(set_to_none=True)
        result = distributed_accumulate_gradients(
            self.model,
            mine,
            self.config,
            old_logprobs=old,
            ref_logprobs=ref,
            current_version=self.version,
        )
        norm = clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
        self.optimizer.step()
        summed = reduce_step_metrics(result)
        loss = summed.pop("loss")
        for key in ("flat_tokens", "unique_tokens", "dedup_ratio"):
            summed.pop(key)
        if mean_entropy is not None:
            summed["entropy"] = mean_entropy
        return loss, norm, summed

    def _entropy_scaled(
        self,
        update: Update,
        mine: list[PackedBatch],
        scores: Sequence[TargetLogprobs],
        config: EntropyScalingConfig,
    ) -> tuple[list[PackedBatch], float]:
        """Entropy-aware advantages over the whole update: every rollout's entropy (each
        lives in one micro-batch on one rank) is summed across ranks first."""
        n = _num_sequences(update)
        entropies = torch.zeros(n, dtype=torch.float64, device=self.device)
        groups = torch.zeros(n, dtype=torch.float64, device=self.device)
        for batch, score in zip(mine, scores, strict=True):
            assert score.entropy is not None
            index = batch.sequence_index
            entropies[index] = sequence_entropies(batch, score.entropy).double()
            groups[index] = batch.sequence_group.double()
        if self.env.world_size > 1:
            dist.all_reduce(entropies)
            dist.all_reduce(groups)
        scale = entropy_advantage_scale(entropies.cpu(), groups.cpu().long(), config)
        return [with_sequence_scale(b, scale) for b in mine], float(entropies.mean())

    def _my_share(self, batches: Sequence[PackedBatch]) -> list[int]:
        return assign_to_ranks(batches, self.env.world_size)[self.env.rank]

    def _broadcast(self, value: Any) -> Any:
        if self.env.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- weights, checkpoints, progress ---------------------------------------------------

    def _publish(self) -> float:
        """Every replica serves the current weights as ``self.version`` (every rank calls)."""
        return self.publisher.publish(self.version)

    def _checkpoint(self) -> None:
        self.checkpoints.save(
            self.step, self.model, self.optimizer, {"weight_version": self.version}
        )
        self._last_checkpoint = self.step


def _describe(error: Exception) -> str:
    """Our own errors say what failed; anything else also says what kind of error it is."""
    if isinstance(error, WeightSyncError | WeightTransferError):
        return str(error)
    return f"{type(error).__name__}: {error}"


def _num_sequences(update: Update) -> int:
    return max(
        (int(b.sequence_index.max()) + 1 for b in update.batches if b.sequence_index.numel()),
        default=0,
    )


def _observation(record: StepRecord) -> StepObservation:
    return StepObservation(
        step=record.step,
        weight_version=record.weight_version,
        step_seconds=record.step_seconds,
        flat_tokens=record.flat_tokens,
        unique_tokens=record.unique_tokens,
        loss=record.loss,
        kl=record.metrics.get("kl", 0.0),
        entropy=record.metrics.get("entropy", 0.0),
        reward_mean=record.reward_mean,
        grad_norm=record.grad_norm,
        weight_sync_seconds=record.sync_seconds,
    )


def _progress_reporter(settings: TrainerSettings) -> Any:
    """Writes `status.progress` of the job, or None where no API server is reachable."""
    import os

    if settings.kubeconfig is None and "KUBERNETES_SERVICE_HOST" not in os.environ:
        return None
    from kubernetes import config as kube_config

    from trieflow.operator.progress import in_cluster_api, report_progress

    if settings.kubeconfig is not None:
        api = kube_config.new_client_from_config(str(settings.kubeconfig))
    else:
        api = in_cluster_api()
    meta = settings.job.metadata

    def report(record: StepRecord) -> None:
        try:
            report_progress(
                api,
                step=record.step,
                weight_version=record.weight_version,
                reward_mean=record.reward_mean,
                namespace=meta.namespace or "default",
                name=meta.name,
            )
        except Exception as err:  # progress is best effort; training goes on
            log.warning("progress report failed: %s", err)

    return report
