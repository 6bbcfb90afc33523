#!/usr/bin/env python
"""
Train or evaluate RetinaNetFLStar (FL*, FL or CE) with detectron2's DefaultTrainer.

    python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --num-gpus 8
    python train_net.py --config-file configs/retinanet_R50_flstar_1x.yaml --eval-only \
        MODEL.WEIGHTS output/retinanet_R50_flstar_1x/model_final.pth
    python train_net.py --config-file configs/quickstart_flstar.yaml   # CPU, embedded data
"""
import os

import detectron2.utils.comm as comm
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup, launch
from detectron2.evaluation import COCOEvaluator, verify_results

from d2_focalstar import add_focalstar_config, check_focalstar_config, register_coco_json_datasets
from d2_focalstar.engine import enable_cpu_ddp, fall_back_to_cpu


class Trainer(DefaultTrainer):
    def __init__(self, cfg):
        enable_cpu_ddp()
        super().__init__(cfg)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        return COCOEvaluator(dataset_name, output_dir=output_folder)


def setup(args):
    cfg = get_cfg()
    add_focalstar_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    fall_back_to_cpu(cfg)
    cfg.freeze()
    check_focalstar_config(cfg)
    register_coco_json_datasets(cfg)
    default_setup(cfg, args)
    return cfg


def main(args):
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        DetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        res = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, res)
        return res

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
