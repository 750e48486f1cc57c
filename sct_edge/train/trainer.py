"""The trainer behind `sct-edge run`: data, schedule, evaluation, commits, resume, events, edge policy.

A store *is* a run's state: besides factors and AdamW moments its manifest holds the run settings, the
data cursor and the committed step, so `--resume` (or simply running on the store again) continues the
run exactly: a run killed at any instant and resumed ends bit-identical to one never interrupted.

The trainer is UI-agnostic: it emits the events of `sct_edge.events` and polls a `Control`; the TUI, the
plain tqdm output and `sct-edge watch` are views of the same stream.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sct_edge.convert.tokenizer import ByteTokenizer, tokenizer_from_json
from sct_edge.engine.adamw import OptimConfig
from sct_edge.engine.flops import PEAK_SIZES, gemm_peak, training_step_flops
from sct_edge.engine.plan import make_plan
from sct_edge.engine.process import ProcessSettings, configure_process, set_compute_threads
from sct_edge.engine.profile import load_profile, resolve_device
from sct_edge.engine.sampling import generate
from sct_edge.engine.step import Engine
from sct_edge.errors import SctError
from sct_edge.events import (
    CommitEvent,
    EndEvent,
    ErrorEvent,
    EvalEvent,
    EventLog,
    MemoryEvent,
    PauseEvent,
    PhaseEvent,
    ResumeEvent,
    SampleEvent,
    StartEvent,
    StepEvent,
    ThrottleEvent,
    memory_snapshot,
)
from sct_edge.flags import flag
from sct_edge.model.config import ModelConfig, RankPolicy, get_preset
from sct_edge.model.transformer import dense_config
from sct_edge.parallel.coordination import Decisions, Replication
from sct_edge.parallel.diloco import DilocoConfig, OuterSync
from sct_edge.parallel.world import World, collective_failure
from sct_edge.store.store import MANIFEST, Store
from sct_edge.train.control import Control
from sct_edge.train.data import Sampler, TrainingData, prepare_training_data
from sct_edge.train.edge_policy import EdgePolicy
from sct_edge.train.schedule_defaults import FINE_TUNING, FROM_SCRATCH, lr_scale, schedule_defaults

# Settings that shape the trajectory: recorded in the store at the first commit, reused on resume.
DEFAULT_PRESET = "tiny"
TRAJECTORY_FIELDS = (
    "data", "val_data", "train_on_prompt", "batch", "seq", "micro_batches", "lr_spectral", "lr_dense", "warmup",
    "min_lr_ratio",
    "weight_decay", "clip", "seed", "steps",
)


def default_data_dir() -> Path:
    """Where the embedded default store lives: the user's data directory."""
    base = os.environ.get("XDG_DATA_HOME")
    if base:
        return Path(base) / "sct-edge"
    if os.uname().sysname == "Darwin":
        return Path.home() / "Library" / "Application Support" / "sct-edge"
    return Path.home() / ".local" / "share" / "sct-edge"


@dataclass
class RunConfig:
    """The settings of `sct-edge run`: each `flag` field is also its command-line option (one default, one help)."""

    profile: str = flag("steamdeck", help="profile name (profiles/NAME.toml) or path to a TOML file")
    budget: str | None = flag(None, help="override the profile's memory budget, e.g. 1GiB or 512MB")
    store: Path | None = flag(None, help="store directory to train (a new one only with an explicit --preset); "
                              "default: the embedded default store in the user's data directory")
    preset: str | None = flag(None, help="preset for a new store (default: tiny; see `sct-edge presets`); with an "
                              "existing store it must match the model the store holds")
    rank: int | None = flag(None, help="rank of every spectral component of a new store (default: the preset's)")
    dense: bool = flag(False, help="train the same architecture with dense weights (baseline)")
    data: list[str] = flag(default_factory=list, metavar="PATH",
                           help="text files or directories, or .jsonl examples ({\"text\"}, {\"prompt\", "
                           "\"completion\"} or {\"messages\"}), to train on (default: the Python standard library's "
                           "source)")
    val_data: list[str] = flag(default_factory=list, metavar="PATH",
                               help="validation files of the same kind as --data (default: a held-out share of it)")
    train_on_prompt: bool = flag(False, help="JSONL examples: the loss covers prompts and user turns too, not only "
                                 "completions and assistant turns")
    steps: int | None = flag(None, help="total optimizer steps of the run (a resumed run stops at the same step); "
                             f"default: the store's recorded total, or {FROM_SCRATCH.steps} ({FINE_TUNING.steps} "
                             "fine-tuning an imported store)")
    time_limit_s: float | None = flag(None, name="--time-limit", metavar="SECONDS",
                                      help="stop (and commit) after this wall-clock time")
    batch: int = flag(16, help="sequences per micro-batch")
    seq: int = flag(128, help="tokens per sequence")
    micro_batches: int = flag(1, help="gradient-accumulation micro-batches per step")
    # None: the schedule defaults for the store (sct_edge.train.schedule_defaults), filled in by the trainer.
    lr_spectral: float | None = flag(None, help="peak learning rate of spectral factors U, s, V (default: "
                                     f"{FROM_SCRATCH.lr_spectral:g}, or {FINE_TUNING.lr_spectral:g} fine-tuning an "
                                     "imported store)")
    lr_dense: float | None = flag(None, help="peak learning rate of dense parameters (norms, ...) (default: "
                                  f"{FROM_SCRATCH.lr_dense:g}, or {FINE_TUNING.lr_dense:g} fine-tuning)")
    warmup: int | None = flag(None, help="linear warmup steps before the cosine decay (default: "
                              f"{FROM_SCRATCH.warmup}, or {FINE_TUNING.warmup} fine-tuning)")
    min_lr_ratio: float | None = None
    weight_decay: float = flag(0.0, help="AdamW weight decay (dense matrices and s)")
    clip: float | None = flag(1.0, help="global gradient-norm clip; 0 disables it")
    eval_every: int = flag(100, help="validation every N steps (0: only at the end)")
    eval_windows: int = 32
    commit_every: int | None = flag(None, help="commit the store every N steps (default: the profile's)")
    seed: int = flag(0, help="seed of the initialisation and the data order")
    run_dir: Path | None = flag(None, help="where events.jsonl goes (default: STORE.runs/)")
    resume: bool = flag(False, help="continue the store's run exactly where it was committed")
    grad_dtype: str = flag("float32", help="across replicas (torchrun): dtype of the exchanged gradients, float32 "
                           "or bfloat16 (half the bytes)")
    sync_every: int = flag(1, metavar="H", help="across replicas (torchrun): 1 exchanges every step's gradients; "
                           "H > 1 runs DiLoCo for slow links: H local steps per replica, then one outer step")
    outer_lr: float = flag(0.7, help="DiLoCo (--sync-every > 1): learning rate of the outer Nesterov step")
    peer_timeout: float = flag(300.0, metavar="SECONDS", help="across replicas (torchrun): how long a rank waits "
                               "for a lost peer before it stops with an error")

    def checked(self) -> RunConfig:
        """These settings as given on a command line, checked, with data paths absolute and a 0 clip as None."""
        for name in ("batch", "seq", "micro_batches"):
            if getattr(self, name) < 1:
                raise SctError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is not None and self.steps < 1:
            raise SctError("--steps must be at least 1")
        if self.grad_dtype not in ("float32", "bfloat16"):
            raise SctError(f"--grad-dtype {self.grad_dtype}: use float32 or bfloat16")
        if self.sync_every < 1:
            raise SctError("--sync-every must be at least 1")
        if self.peer_timeout <= 0:
            raise SctError("--peer-timeout must be positive")
        for option, paths in (("--data", self.data), ("--val-data", self.val_data)):
            for path in paths:
                if not Path(path).exists():
                    raise SctError(f"{option} {path}: no such file or directory")
        return dataclasses.replace(self, data=[str(Path(p).resolve()) for p in self.data],
                                   val_data=[str(Path(p).resolve()) for p in self.val_data], clip=self.clip or None)

    def store_path(self) -> Path:
        if self.store is not None:
            return self.store
        preset = self.preset or DEFAULT_PRESET
        return default_data_dir() / "stores" / (f"{preset}-dense" if self.dense else preset)


class Trainer:
    def __init__(self, run: RunConfig, events: EventLog, control: Control | None = None,
                 world: World | None = None) -> None:
        self.run_config = run
        self.defaults_used: dict | None = None  # the schedule defaults this run filled in, for the start event
        self.events = events
        self.control = control or Control()
        self.world = world or World()
        self.replication: Replication | None = None
        self.outer: OuterSync | None = None
        self.profile = load_profile(run.profile, run.budget)
        self.device = resolve_device(self.profile)

    # ------------------------------------------------------------------ set-up

    def _existing_store(self, path: Path) -> Store | None:
        run = self.run_config
        if not (path / MANIFEST).exists():
            if run.resume:
                raise SctError(f"--resume: there is no store at {path} to resume")
            if run.store is not None and run.preset is None:
                # A mistyped path must not silently become a new model trained from scratch.
                raise SctError(f"there is no store at {path}; pass --preset NAME to create a new one there "
                               "(see `sct-edge presets`)")
            return None
        store = Store.open(path)
        if run.preset is not None and store.config.name != run.preset:
            raise SctError(f"store {path} holds a {store.config.name} model, not {run.preset}")
        return store

    def _new_config(self) -> ModelConfig:
        run = self.run_config
        config = get_preset(run.preset or DEFAULT_PRESET)
        if run.rank is not None:
            config = config.with_ranks(RankPolicy.uniform(run.rank, dense_embeddings=config.ranks.embed is None))
        if run.dense:
            config = dense_config(config)
        config.validate()
        return config

    def _settings(self, store: Store | None) -> dict:
        """The trajectory settings: the store's when it has a run, else this invocation's."""
        run = self.run_config
        saved = None if store is None else store.state.get("run")
        if saved is None or store.step == 0:
            # Nothing committed yet (a run killed before its first commit): start from the beginning. Schedule
            # settings not given come from the defaults for this store: fine-tuning an imported model, or not.
            defaults = schedule_defaults(None if store is None else store.extra)
            settings, filled = defaults.fill({k: getattr(run, k) for k in TRAJECTORY_FIELDS})
            self.defaults_used = {"name": defaults.name, **filled} if filled else None
            return settings
        # Running on a trained store continues its run: what shapes the trajectory comes from the store;
        # only the total may change (`--steps`). Other data would silently be a different run: refuse it.
        if run.data and run.data != saved["data"]:
            raise SctError(f"store {store.path} continues a run on {', '.join(saved['data']) or 'the default corpus'}"
                           f"; --data names other text (train a new store for a new run)")
        # Across N replicas each rank keeps the moments of the blocks it owns only: another N would resume
        # other blocks from moments this store never updated.
        # (A single process's store holds every moment: any number of replicas can start from it.)
        trained_by = store.state.get("replicas", {}).get("world_size", 1)
        if trained_by > 1 and trained_by != self.world.size:
            raise SctError(f"store {store.path} was trained by {trained_by} replica(s) and each kept only its own "
                           f"blocks' optimizer moments: resume it with {trained_by} rank(s), not {self.world.size}")
        # Runs recorded before JSONL data existed trained on text with no validation files.
        return {"val_data": [], "train_on_prompt": False, **saved, "steps": run.steps or saved["steps"]}

    # ------------------------------------------------------------------ the run

    def run(self) -> int:
        events = self.events
        try:
            try:
                return self._run()
            except RuntimeError as error:
                if not self.world.distributed:
                    raise
                # A collective failed: a peer died, hung past --peer-timeout, or left. Nothing was committed.
                raise SctError(f"rank {self.world.rank}: lost contact with the other replicas "
                               f"({collective_failure(error)}); store "
                               f"{self.run_config.store_path()} stays at its last commit") from None
        except SctError as error:
            events.emit(ErrorEvent(message=str(error)))
            events.emit(EndEvent(step=None, reason="error"))
            raise

    def _run(self) -> int:
        run, profile, events = self.run_config, self.profile, self.events
        # Everything that can refuse the run (store, settings, budget, data) is checked before anything is
        # written, so bad input leaves no new store behind.
        if run.sync_every > 1 and not self.world.distributed:
            raise SctError(f"--sync-every {run.sync_every} needs several replicas: launch the run with torchrun")
        path = run.store_path()
        store = self._existing_store(path)
        config = store.config if store is not None else self._new_config()
        tokenizer = tokenizer_from_json(store.tokenizer_json()) if store is not None else ByteTokenizer()
        settings = self._settings(store)
        total = settings["steps"]
        seq = min(settings["seq"], config.max_seq_len)
        # Per-step exchange across replicas holds buckets in flight; DiLoCo replicas exchange between steps.
        exchanging = self.world.size if run.sync_every == 1 else 1
        plan = make_plan(config, profile, settings["batch"], seq, settings["micro_batches"], "lm",
                         replicas=exchanging, grad_dtype=run.grad_dtype, clip=settings["clip"] is not None)
        configure_process(ProcessSettings(threads=plan.compute_threads(torch.get_num_threads()), malloc=plan.malloc))
        corpus = prepare_training_data(
            [Path(p) for p in settings["data"]] or None, tokenizer, path.with_name(path.name + ".tokens"), seq,
            val_sources=[Path(p) for p in settings["val_data"]] or None,
            chat_template=None if store is None else store.extra.get("chat_template"),
            template_source=f"store {path}", train_on_prompt=settings["train_on_prompt"])
        # Across replicas every rank draws the global batch and trains on its rows of it (`Replication.my_rows`).
        sampler = corpus.sampler(settings["batch"] * self.world.size, seq, settings["seed"])
        # Validation too short for one window is known now, not at the first evaluation: it degrades here.
        eval_note = corpus.eval_seq(seq)[1]
        if store is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            store = Store.create(path, config, seed=run.seed, state_dtype=getattr(torch, profile.state_dtype),
                                 tokenizer_json=tokenizer.to_json())
        with store.lock():
            replication = None
            if self.world.distributed:
                replication = Replication(self.world, config.n_layers, getattr(torch, run.grad_dtype))
                replication.resolve_prepared(store)
                replication.check(store)
                if run.sync_every > 1:
                    store.add_outer_state()  # the anchor starts as the weights the replicas agree on
                    self.outer = OuterSync(DilocoConfig(run.sync_every, run.outer_lr), replication.sync)
            elif store.prepared_step() is not None:
                store.abort_prepared()  # a commit prepared by replicas and never finished: not part of this run
            self.replication = replication
            if store.step > 0 and "sampler" in store.state:
                sampler.load_state_dict(store.state["sampler"])
            optim = OptimConfig(lr_spectral=settings["lr_spectral"], lr_dense=settings["lr_dense"],
                                weight_decay=settings["weight_decay"], max_grad_norm=settings["clip"])
            # DiLoCo replicas step alone (every rank keeps all moments) and meet every --sync-every steps.
            engine = Engine(store, plan, optim, self.device, on_event=events.emit,
                            replicas=None if replication is None or self.outer is not None else replication.sync)
            commit_every = run.commit_every or profile.commit_every
            policy = EdgePolicy(profile.battery, profile.thermal)
            events.emit(StartEvent(
                config=store.config.to_dict(), store=str(store.path), profile=profile.name,
                budget_bytes=profile.memory_budget, batch=settings["batch"], seq=seq,
                micro_batches=settings["micro_batches"], workload="lm", total_steps=total, start_step=store.step,
                n_blocks=store.config.n_layers, resident_blocks=plan.resident_blocks,
                prefetch_depth=plan.prefetch_depth, activations=plan.activations, clip=settings["clip"],
                predicted_peak_bytes=plan.predicted_peak_bytes, corpus=corpus.describe(),
                rank=self.world.rank, world_size=self.world.size,
                data=corpus.summary(), defaults=self.defaults_used, notes=[eval_note] if eval_note else [],
            ))
            monitor = MemoryMonitor(events)
            monitor.start()
            try:
                reason = self._loop(store, engine, sampler, corpus, settings, total, seq, commit_every, policy, plan)
            finally:
                monitor.stop()
                engine.close()
            events.emit(EndEvent(step=store.step, reason=reason))
        return 0

    def _commit(self, store: Store, engine: Engine, step: int, settings: dict, sampler: Sampler) -> None:
        started = time.perf_counter()
        self.events.emit(PhaseEvent(phase="commit", step=step))
        engine.flush()
        state = {"run": settings, "sampler": sampler.state_dict()}
        if self.world.distributed:
            state["replicas"] = {"world_size": self.world.size, "rank": self.world.rank}
        if self.replication is None:
            store.commit(step, state)
        else:
            self.replication.commit(store, step, state)
        self.events.emit(CommitEvent(step=step, seconds=time.perf_counter() - started))

    def _evaluate(self, engine: Engine, corpus: TrainingData, seq: int, step: int, settings: dict) -> None:
        self.events.emit(PhaseEvent(phase="eval", step=step))
        windows = corpus.eval_batches(seq, settings["batch"], self.run_config.eval_windows)
        loss = engine.evaluate(list(windows))
        self.events.emit(EvalEvent(step=step, val_loss=loss, val_ppl=math.exp(min(loss, 50))))

    def _sample(self, engine: Engine, corpus: TrainingData, store: Store, step: int) -> None:
        self.events.emit(PhaseEvent(phase="sample", step=step))
        tokenizer = tokenizer_from_json(store.tokenizer_json())
        prompt = corpus.sample_prompt()
        ids = generate(engine, prompt, max_new_tokens=120, temperature=0.8, top_k=40, seed=step)
        self.events.emit(SampleEvent(step=step, text=tokenizer.decode(prompt + ids)))

    def _loop(self, store, engine, sampler, corpus, settings, total, seq, commit_every, policy, plan) -> str:
        events, control, run = self.events, self.control, self.run_config
        # MFU on the progress line: model FLOPs over this machine's GEMM peak in the profile's compute dtype,
        # measured once here on the two smaller product sizes (a fraction of a second; `sct-edge bench step`
        # measures all three).
        peak = gemm_peak(self.profile.usable_threads(), sizes=PEAK_SIZES[:2],
                         dtype=self.profile.compute_dtype).flops_per_s
        started = time.monotonic()
        step = first_step = store.step
        last_commit = last_eval = step
        # The plan may compute on fewer threads than the profile allows (`MemoryPlan.compute_threads`).
        threads = plan.compute_threads(self.profile.usable_threads())
        paused_by: str | None = None
        while step < total:
            decision = policy.check()
            if decision.paused_by != paused_by:
                if decision.paused_by:
                    events.emit(PauseEvent(reason=decision.paused_by))
                else:
                    events.emit(ResumeEvent(reason=paused_by))
                paused_by = decision.paused_by
            wanted_threads = plan.compute_threads(self.profile.usable_threads(decision.threads))
            if wanted_threads != threads:
                threads = wanted_threads
                set_compute_threads(threads)
                events.emit(ThrottleEvent(threads=threads, reason="thermal" if decision.threads else "cool"))
            out_of_time = run.time_limit_s is not None and time.monotonic() - started > run.time_limit_s
            if self.replication is not None:
                # Every rank takes every rank's wishes: collectives must never wait on one that chose otherwise.
                agreed = self.replication.agree(Decisions(
                    stop=control.stop_requested.is_set(), commit=control.commit_requested.is_set(),
                    evaluate=control.eval_requested.is_set(), sample=control.sample_requested.is_set(),
                    pause=bool(control.paused or paused_by), out_of_time=out_of_time))
                for wanted, request in ((agreed.stop, control.stop_requested),
                                        (agreed.commit, control.commit_requested),
                                        (agreed.evaluate, control.eval_requested),
                                        (agreed.sample, control.sample_requested)):
                    if wanted:
                        request.set()
                out_of_time = agreed.out_of_time
                if agreed.pause and not agreed.stop:
                    time.sleep(1.0)  # all ranks wait together until no rank is paused
                    continue
            if control.stop_requested.is_set():
                break
            if control.paused or paused_by:
                if control.paused and paused_by is None:
                    events.emit(PauseEvent(reason="user"))
                    control.wait_while_paused()
                    events.emit(ResumeEvent(reason="user"))
                else:
                    time.sleep(1.0)
                continue
            if out_of_time:
                # The run's last word is its validation loss, as when it reaches its total.
                if last_eval != step:
                    self._evaluate(engine, corpus, seq, step, settings)
                self._commit(store, engine, step, settings, sampler)
                return "time_limit"
            micro = sampler.draw(settings["micro_batches"])
            if self.replication is not None:
                micro = [self.replication.my_rows(mb) for mb in micro]
            scale = lr_scale(step + 1, total, settings["warmup"], settings["min_lr_ratio"])
            step_started = time.perf_counter()
            result = engine.train_step(micro, step + 1, scale)
            step += 1
            comm_s, comm_bytes = result.comm_s, result.comm_bytes
            if self.outer is not None:
                if self.outer.due(step):
                    self.outer.meet(engine)
                loss = self.replication.sync.mean(result.loss)
                stats = self.replication.sync.take_stats()
                result = dataclasses.replace(result, loss=loss)
                comm_s, comm_bytes = comm_s + stats.wait_s, comm_bytes + stats.bytes_sent
            step_s = time.perf_counter() - step_started
            step_flops = sum(training_step_flops(store.config, x.shape[0], x.shape[1]) for x, _ in micro)
            memory = memory_snapshot()
            elapsed = time.monotonic() - started
            events.emit(StepEvent(
                step=step, total_steps=total, loss=result.loss, lr_spectral=settings["lr_spectral"] * scale,
                lr_dense=settings["lr_dense"] * scale, tokens_per_s=result.tokens / step_s, step_s=step_s,
                phase_s=result.phase_s, bytes_read=result.bytes_read, bytes_written=result.bytes_written, **memory,
                budget_bytes=self.profile.memory_budget, resident_blocks=plan.resident_blocks,
                ortho_err=result.ortho_err, grad_norm=result.grad_norm, battery=decision.battery,
                temperature_c=decision.temperature_c, eta_s=elapsed / (step - first_step) * (total - step),
                comm_s=comm_s, comm_bytes=comm_bytes, mfu=step_flops / step_s / peak,
            ))
            if step % commit_every == 0 or control.commit_requested.is_set():
                control.commit_requested.clear()
                self._commit(store, engine, step, settings, sampler)
                last_commit = step
            if (run.eval_every and step % run.eval_every == 0) or control.eval_requested.is_set() or step == total:
                control.eval_requested.clear()
                self._evaluate(engine, corpus, seq, step, settings)
                last_eval = step
            if control.sample_requested.is_set():
                control.sample_requested.clear()
                self._sample(engine, corpus, store, step)
        if step != last_commit or store.step != step:
            self._commit(store, engine, step, settings, sampler)
        return "done" if step >= total else "stopped"


class MemoryMonitor:
    """Emits a `memory` event every second while the run is alive (the TUI's headroom panel in watch mode)."""

    def __init__(self, events: EventLog, interval_s: float = 1.0) -> None:
        self.events = events
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="sct-memory", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.events.emit(MemoryEvent(**memory_snapshot()))

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def inference_engine(store: Store, profile_name: str, budget: str | None, seq: int) -> Engine:
    """A streamed engine for evaluation and generation: blocks paged under the profile as in training."""
    profile = load_profile(profile_name, budget)
    plan = make_plan(store.config, profile, 1, min(seq, store.config.max_seq_len), 1, "lm")
    return Engine(store, plan, OptimConfig(), resolve_device(profile))
