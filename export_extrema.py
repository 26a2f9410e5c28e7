"""Export an ExtreMA backbone as a Hub-ready folder: the weights (`save_pretrained`, with the remote code), the image
processor, and a model card with the training recipe, the kNN result and a usage snippet.

Used by `train_extrema.py` (the teacher at the end of a run, or every --export_every steps) and by
`scripts/convert_official_checkpoint.py` (the released checkpoints).
"""

import logging
import re
from pathlib import Path

from data_extrema import build_image_processor

logger = logging.getLogger("export_extrema")


def export_backbone(backbone, output_dir, **card_fields) -> Path:
    """Save an `ExtremaModel` with `save_pretrained`, its image processor (the evaluation transform, see
    `data_extrema.build_image_processor`) and a model card; returns the folder.

    The folder loads with `AutoModel.from_pretrained(folder, trust_remote_code=True)`: the model classes call
    `register_for_auto_class`, so the config gets an `auto_map` and the modeling code is copied beside the weights.
    Card fields (all optional): model_id (used in the usage snippet), datasets (list), recipe (dict or str),
    knn (dict with top1/top5 and optionally k, temperature, split, dataset), tags (list), description (str).
    The kNN top-1 also goes into the card's metadata as a model-index result (the Hub shows it beside the model) when
    its dataset is a Hub id: knn["dataset"], else the first of `datasets`.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData
    output_dir = Path(output_dir)
    backbone.save_pretrained(output_dir, safe_serialization=True)
    build_image_processor(backbone.config.image_size).save_pretrained(output_dir)

    text = model_card_text(backbone.config, **card_fields)
    knn, datasets = card_fields.get("knn"), card_fields.get("datasets") or None
    knn_dataset = knn and (knn.get("dataset") or (datasets or [None])[0])
    eval_results = None
    if knn_dataset:  # a kNN classifier on the frozen pooler_output: image classification, scored by accuracy
        k, temperature = knn.get("k", 200), knn.get("temperature", 0.07)
        eval_results = [
            EvalResult(
                task_type="image-classification",
                task_name="Image classification (weighted kNN on frozen features)",
                dataset_type=knn_dataset,
                dataset_name=knn_dataset,
                dataset_split=knn.get("split"),
                metric_type="accuracy",
                metric_name=f"kNN top-1 accuracy (k={k}, T={temperature})",
                metric_value=round(float(knn["top1"]), 2),
                metric_args={"k": k, "temperature": temperature},
            )
        ]
    card_data = ModelCardData(
        model_name=text.partition("\n")[0].removeprefix("# ") if eval_results else None,  # the card's title
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license="apache-2.0",
        tags=["extrema", "vision", "self-supervised-learning", "masked-image-modeling", *card_fields.get("tags", [])],
        datasets=datasets,
        eval_results=eval_results,
    )
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{text}")
    card.save(output_dir / "README.md")
    return output_dir


def model_card_text(config, model_id=None, datasets=None, recipe=None, knn=None, description=None, **_) -> str:
    """The card's Markdown below the metadata: title, description, recipe table, kNN result, usage, citation."""

    def readable(value) -> str:  # long decimals to 3 significant digits: 375 / 468 steps shows 0.801 epochs
        return re.sub(r"\d+\.\d{5,}", lambda number: f"{float(number[0]):.{max(3, number[0].index('.'))}g}", str(value))

    model_id = model_id or "path/to/this/folder"
    lines = [
        f"# ExtreMA {config.hidden_size}-wide, {config.num_hidden_layers}-layer ViT/{config.patch_size}",
        "",
        description
        or (
            "A vision transformer pre-trained without labels with ExtreMA (Wu et al., 2022, "
            "[arXiv:2206.04667](https://arxiv.org/abs/2206.04667)): BYOL in which a student sees only 10-25% of "
            "the patches (several disjoint masks) and predicts the representation that a momentum teacher computes "
            "from the full image. This is the teacher backbone. `pooler_output` (the class token built by "
            "class-attention blocks) is the instance representation; `last_hidden_state[:, 1:]` are the patch "
            "tokens (the distributed representation)."
        ),
        "",
    ]
    if datasets:
        lines += [f"Pre-training data: {', '.join(datasets)}.", ""]
    if recipe:
        lines += ["## Training recipe", ""]
        if isinstance(recipe, dict):
            lines += ["| setting | value |", "|---|---|", *[f"| {k} | {readable(v)} |" for k, v in recipe.items()]]
        else:
            lines += [readable(recipe)]
        lines += [""]
    if knn:
        where = f" on {knn['split']}" if knn.get("split") else ""
        lines += [
            "## Evaluation",
            "",
            f"Weighted kNN (k={knn.get('k', 200)}, T={knn.get('temperature', 0.07)}) on `pooler_output`{where}: "
            f"top-1 {knn['top1']:.2f}%, top-5 {knn['top5']:.2f}%.",
            "",
        ]
    lines += [
        "## Usage",
        "",
        "```python",
        "import torch",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModel",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{model_id}")',
        f'model = AutoModel.from_pretrained("{model_id}", trust_remote_code=True).eval()',
        'inputs = processor(images=Image.open("image.jpg").convert("RGB"), return_tensors="pt")',
        "with torch.no_grad():",
        "    outputs = model(**inputs)",
        "instance = outputs.pooler_output  # (1, hidden): the image's representation",
        "patches = outputs.last_hidden_state[:, 1:]  # (1, num_patches, hidden): one token per patch",
        "```",
        "",
        "## Citation",
        "",
        "```bibtex",
        "@article{wu2022extreme,",
        "  title={Extreme Masking for Learning Instance and Distributed Visual Representations},",
        "  author={Wu, Zhirong and Lai, Zihang and Sun, Xiao and Lin, Stephen},",
        "  journal={arXiv preprint arXiv:2206.04667},",
        "  year={2022}",
        "}",
        "```",
    ]
    return "\n".join(lines) + "\n"


def push_to_hub(folder: Path, repo_id: str, private: bool, commit_message: str):
    """Upload an exported folder to the Hub model repository `repo_id`, created if needed."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message)
    logger.info("Uploaded %s to https://huggingface.co/%s", folder, repo_id)
