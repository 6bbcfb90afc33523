#!/usr/bin/env python
"""
Train or evaluate RetinaNetFLStar or FCOSFLStar (FL*, FL, CE, ...) with detectron2's DefaultTrainer.

Examples:
  python train_net.py --config-file configs/quickstart_flstar.yaml   # CPU, embedded data
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8 --resume
  python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
"""
import os
import weakref

import d2_focalstar  # noqa: F401  first: it quiets fvcore's import-time warnings
import detectron2.utils.comm as comm
from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, hooks
from detectron2.evaluation import DatasetEvaluators, verify_results

from d2_focalstar import register_coco_json_datasets
from d2_focalstar.checkpoint import SafeCheckpointer
from d2_focalstar.config import load_config
from d2_focalstar.engine import (die_with_launcher, enable_cpu_ddp, quiet_reported_errors, run_command,
                                 setup_project_logger, training_errors)
from d2_focalstar.evaluation import FastCOCOEvaluator
from d2_focalstar.mapper import CheckedDatasetMapper, EvaluationImageError, summarize_data_faults
from d2_focalstar.preemption import CheckpointOnSignal
from d2_focalstar.results import write_results
from d2_focalstar.safety import build_safety_evaluator

if __name__ == "__mp_main__":  # a process of detectron2's launch: it dies with the launcher
    die_with_launcher()


def fault_log(cfg):
    return os.path.join(cfg.OUTPUT_DIR, "data_faults.jsonl")


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        enable_cpu_ddp()
        quiet_reported_errors(FloatingPointError, EvaluationImageError)  # train() reports them
        super().__init__(cfg)

    def build_hooks(self):
        # atomic saves, no NaN weights saved, no code run when loading
        self.checkpointer = SafeCheckpointer(self._trainer.model, self.cfg.OUTPUT_DIR,
                                             trainer=weakref.proxy(self))
        faults = hooks.CallbackHook(after_train=lambda t: summarize_data_faults(fault_log(t.cfg)))
        stock = super().build_hooks()
        # every process waits for rank 0's model_final before the final evaluation (only after
        # the last step: after_train also runs when a rank fails, and must not wait then)
        wait = hooks.CallbackHook(after_train=lambda t: comm.synchronize() if t.iter >= t.max_iter else None)
        stock.insert([isinstance(h, hooks.EvalHook) for h in stock].index(True), wait)
        # a checkpoint when a SLURM job is told to stop (preemption, time limit)
        return [faults] + stock + [CheckpointOnSignal(self.checkpointer)]

    def train(self):
        with training_errors(self):  # divergence, unreadable test images: one line, nothing lost
            return super().train()

    @classmethod
    def build_train_loader(cls, cfg):
        # bad images are skipped and bad boxes clipped or removed, each recorded in the fault log
        return build_detection_train_loader(cfg, mapper=CheckedDatasetMapper(cfg, True, fault_log(cfg)))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        # a test image that cannot be read stops the evaluation naming it (skipping it would
        # change the AP)
        return build_detection_test_loader(cfg, dataset_name, mapper=CheckedDatasetMapper(cfg, False))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference")
            if len(cfg.DATASETS.TEST) > 1:  # a folder per test dataset: none overwrites another's
                output_folder = os.path.join(output_folder, dataset_name)
        # detectron2's COCOEvaluator; its fast path on faster-coco-eval where detectron2's _C is missing
        evaluators = [FastCOCOEvaluator(dataset_name, output_dir=output_folder),
                      build_safety_evaluator(cfg, dataset_name, output_folder)]
        return DatasetEvaluators([e for e in evaluators if e is not None])


def config_of(args):
    # get_cfg, add_focalstar_config, merge file and opts, all checked
    return load_config(args.config_file, args.opts, num_gpus=args.num_gpus, eval_only=args.eval_only,
                       resume=args.resume, num_machines=args.num_machines)


def setup(args):
    cfg = config_of(args)
    cfg.freeze()
    register_coco_json_datasets(cfg)
    default_setup(cfg, args)  # detectron2's and fvcore's loggers, the config dump, the seed
    setup_project_logger(cfg.OUTPUT_DIR, comm.get_rank())  # ours: to the console and log.txt
    return cfg


def main(args):
    cfg = setup(args)
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
    trainer.train()
    # DefaultTrainer.train() returns the final evaluation only if TEST.EXPECTED_RESULTS is set
    res = getattr(trainer, "_last_eval_results", None) or {}
    if comm.is_main_process():  # also without evaluation: it marks the run as finished
        # trainer.iter is MAX_ITER + 1 when a finished run is resumed (no step left to run)
        write_results(cfg, res, iteration=min(trainer.iter, cfg.SOLVER.MAX_ITER))
    return res


def argument_parser():
    """detectron2's command line, with this project's description and examples."""
    parser = default_argument_parser(epilog=__doc__.split("\n\n", 1)[1])
    parser.description = __doc__.strip().splitlines()[0]
    for action in parser._actions:  # help texts that fit this project
        if action.dest == "opts":
            action.help = "config KEY VALUE pairs, last, e.g. MODEL.FOCALSTAR.GAMMA 0.5 OUTPUT_DIR out/g0.5"
        elif action.dest == "num_gpus":
            action.help = "GPUs per machine (without CUDA: this many CPU processes)"
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    # config, output folder, datasets and weights checked before any process starts; errors in one line
    run_command(main, args, config_of)
