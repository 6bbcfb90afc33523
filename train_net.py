#!/usr/bin/env python
"""
Train or evaluate RetinaNetFLStar or FCOSFLStar (FL*, FL, CE, ...) with detectron2's DefaultTrainer.

Examples:
  python train_net.py --config-file configs/quickstart_flstar.yaml   # CPU, embedded data
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8 --resume
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --eval-only \\
      MODEL.WEIGHTS out/model_final.pth
"""

import warnings

# fvcore jit-scripts its losses when detectron2 imports it, which recent torch deprecates loudly
warnings.filterwarnings(
    "ignore", message="`torch.jit.script` is deprecated", category=FutureWarning
)

import contextlib
import os

import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import DatasetEvaluators, verify_results

from d2_focalstar.data import CheckedDatasetMapper, register_config_datasets
from d2_focalstar.evaluation import build_dataset_evaluator, build_safety_evaluator
from d2_focalstar.run import (
    SafeCheckpointer,
    command_errors,
    default_argument_parser_for,
    die_with_launcher,
    enable_cpu_ddp,
    forget_divergence,
    launch_processes,
    prepare_run,
    project_hooks,
    quiet_reported_errors,
    reported_errors,
    setup_project_logger,
    training_errors,
    write_results,
)

if __name__ == "__mp_main__":  # a process of detectron2's launch: it dies with the launcher
    die_with_launcher()


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        enable_cpu_ddp()  # several CPU processes without a GPU (gloo)
        quiet_reported_errors()  # train() reports divergence and unreadable test images in one line
        super().__init__(cfg)

    def build_hooks(self):
        # detectron2's, with safe checkpoints, the data-fault summary, every process waiting for
        # model_final before the final evaluation, and a checkpoint when SLURM stops the job
        return project_hooks(self, super().build_hooks, fault_log(self.cfg))

    def train(self):
        with training_errors(self):  # divergence, unreadable test images: one line, nothing lost
            return super().train()

    @classmethod
    def build_train_loader(cls, cfg):
        # bad images are skipped and bad boxes clipped or removed, each recorded in the fault log
        return build_detection_train_loader(
            cfg, mapper=CheckedDatasetMapper(cfg, True, fault_log(cfg))
        )

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # a test image that cannot be read stops the evaluation naming it (skipping it would change
        # the AP)
        return build_detection_test_loader(
            cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False)
        )

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:  # a folder per test dataset: none overwrites another's
            several = len(cfg.DATASETS.TEST) > 1
            output_folder = os.path.join(
                cfg.OUTPUT_DIR, "inference", *([dataset_name] if several else [])
            )
        # by the dataset's evaluator_type: COCO's (on faster-coco-eval where detectron2's _C is
        # missing) or detectron2's Pascal VOC; the safety metrics beside it
        evaluators = [
            build_dataset_evaluator(dataset_name, output_folder),
            build_safety_evaluator(cfg, dataset_name, output_folder),
        ]
        return DatasetEvaluators([e for e in evaluators if e is not None])


def fault_log(cfg):
    return os.path.join(cfg.OUTPUT_DIR, "data_faults.jsonl")


def main(cfg, args):
    """One process of the run: ``cfg`` is the config checked once by prepare_run."""
    register_config_datasets(cfg)  # catalogs are per process
    default_setup(cfg, args)  # detectron2's and fvcore's loggers, the config dump, the seed
    setup_project_logger(cfg.OUTPUT_DIR, comm.get_rank())  # ours: to the console and log.txt
    if args.eval_only:
        model = Trainer.build_model(cfg)
        checkpointer = SafeCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        checkpointer.require_all_weights()  # not ImageNet backbone weights with random heads
        checkpointer.require_finite_weights()
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
            write_results(cfg, res, iteration=None)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    if comm.is_main_process():  # a divergence recorded by an earlier try no longer holds
        forget_divergence(cfg.OUTPUT_DIR)
    trainer.train()
    res = getattr(trainer, "_last_eval_results", None) or {}  # the final evaluation
    if comm.is_main_process():  # also without evaluation: it marks the run as finished
        # trainer.iter is MAX_ITER + 1 when a finished run is resumed (no step left to run)
        write_results(cfg, res, iteration=min(trainer.iter, cfg.SOLVER.MAX_ITER))
    return res


def argument_parser():
    return default_argument_parser_for(__doc__)  # detectron2's, with this project's help texts


def command(args):
    """Check everything once, then run ``main`` in args.num_gpus x args.num_machines processes;
    bad input and failures are one line (docs/RELIABILITY.md)."""
    print("Command Line Args:", args)
    with (
        command_errors("train_net.py", eval_only=args.eval_only) as run,
        contextlib.ExitStack() as held,
    ):
        setup_project_logger()
        # config, output folder (locked: one run at a time in it), seed, datasets, weights
        run.cfg = cfg = prepare_run(args, held)
        launch_processes(main, args, cfg, reported=reported_errors())


if __name__ == "__main__":
    command(argument_parser().parse_args())
