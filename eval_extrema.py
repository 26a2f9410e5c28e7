"""Evaluation of a backbone's instance representation: feature extraction and weighted kNN (Wu et al. 2018).

The training loop's kNN monitor (`knn_accuracy`, called by `train_extrema.evaluate_knn`) and `scripts/eval_knn.py`
both classify with `weighted_knn`, on features from `extract_features`, of images read by
`data_extrema.labelled_loader`. Reading order: `extract_features`, `weighted_knn`, `knn_accuracy`.
"""

import os

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from data_extrema import UsageError


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@torch.no_grad()
def extract_features(backbone, dataloader, device=None, max_samples=None):
    """Instance representations `backbone(pixel_values).pooler_output` of a loader's images.

    The loader yields dicts with "pixel_values" and "label"/"labels" (or (pixel_values, labels) tuples). Returns
    features (N, D) float32 and labels (N,) long on the CPU; labels are -1 for unlabelled images.
    """
    device = torch.device(device) if device is not None else next(backbone.parameters()).device
    was_training = backbone.training
    backbone.eval()
    features, labels, seen = [], [], 0
    for batch in tqdm(dataloader, desc="features", leave=False, disable=not _is_main_process()):
        if isinstance(batch, dict):
            pixel_values = batch["pixel_values"]
            batch_labels = batch.get("label", batch.get("labels"))
        else:
            pixel_values, batch_labels = batch[0], (batch[1] if len(batch) > 1 else None)
        if batch_labels is None:
            batch_labels = torch.full((pixel_values.shape[0],), -1)
        if max_samples is not None:
            pixel_values, batch_labels = pixel_values[: max_samples - seen], batch_labels[: max_samples - seen]
        features.append(backbone(pixel_values.to(device)).pooler_output.float().cpu())  # (B, D)
        labels.append(torch.as_tensor(batch_labels).long())
        seen += pixel_values.shape[0]
        if max_samples is not None and seen >= max_samples:
            break
    backbone.train(was_training)
    if not features:
        raise UsageError("The loader yielded no image to extract features from.")
    return torch.cat(features), torch.cat(labels)


@torch.no_grad()
def weighted_knn(
    train_features, train_labels, test_features, test_labels, k=200, temperature=0.07, num_classes=None,
    chunk_size=256,
):  # fmt: skip
    """Weighted kNN classification (Wu et al. 2018, as in DINO's eval_knn): top-1 / top-5 accuracy in %.

    Cosine similarity of L2-normalised features; each of the k nearest gallery images votes for its class with weight
    exp(similarity / temperature). Test images are processed in chunks of `chunk_size` to bound memory.
    """
    # float32 even under autocast (the training loop's kNN runs inside it): bf16 similarities would tie and reorder
    # neighbours, and scatter_add_ needs one dtype
    with torch.autocast(train_features.device.type, enabled=False):
        train_features = F.normalize(train_features.float(), dim=1)
        test_features = F.normalize(test_features.float(), dim=1).to(train_features.device)
        train_labels = train_labels.long().to(train_features.device)
        test_labels = test_labels.long().to(train_features.device)
        if num_classes is None:
            num_classes = int(max(train_labels.max(), test_labels.max())) + 1
        k = min(k, train_features.shape[0])
        top1 = top5 = 0
        for start in range(0, test_features.shape[0], chunk_size):
            queries, targets = test_features[start : start + chunk_size], test_labels[start : start + chunk_size]
            similarity, neighbors = (queries @ train_features.T).topk(k, dim=1)  # (b, k)
            votes = torch.zeros(queries.shape[0], num_classes, device=queries.device)
            votes.scatter_add_(1, train_labels[neighbors], (similarity / temperature).exp())  # (b, C)
            predictions = votes.topk(min(5, num_classes), dim=1).indices  # (b, 5)
            top1 += (predictions[:, 0] == targets).sum().item()
            top5 += (predictions == targets[:, None]).any(dim=1).sum().item()
        total = test_features.shape[0]
        return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total}


def knn_accuracy(backbone, gallery, queries, device, k: int = 200, temperature: float = 0.07) -> dict:
    """Weighted kNN accuracy (`weighted_knn`) of a backbone's features: the `queries` batches classified by their
    neighbours among the `gallery` batches (loaders of {"pixel_values", "label"}, e.g. `data_extrema.labelled_loader`).
    """
    train_features, train_labels = extract_features(backbone, gallery, device)
    test_features, test_labels = extract_features(backbone, queries, device)
    return weighted_knn(train_features, train_labels, test_features, test_labels, k=k, temperature=temperature)


def linear_probe_on_features(
    train_features, train_labels, test_features, test_labels, epochs=30, lr=0.1, batch_size=1024, seed=0,
):  # fmt: skip
    """A linear classifier on frozen features: top-1 / top-5 accuracy in % on the test features.

    The fast form of the linear probe (DINO evaluates on cached features the same way): features are standardised
    with the training set's statistics (the non-affine BatchNorm of the paper's probe, in its inference form), then
    one Linear layer is trained with SGD (momentum 0.9, no weight decay) and a cosine schedule, on full batches of
    `batch_size` features. No augmentation: every run on the same features gives the same number.
    """
    generator = torch.Generator().manual_seed(seed)
    mean, std = train_features.mean(dim=0), train_features.std(dim=0) + 1e-6
    train_x, test_x = (train_features - mean) / std, (test_features - mean) / std
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    classifier = torch.nn.Linear(train_x.shape[1], num_classes)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9)
    steps = epochs * -(-len(train_x) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    with torch.autocast(train_x.device.type, enabled=False), torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(train_x), generator=generator).split(batch_size):
                loss = F.cross_entropy(classifier(train_x[batch]), train_labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        with torch.no_grad():
            predictions = classifier(test_x).topk(min(5, num_classes), dim=1).indices
    top1 = (predictions[:, 0] == test_labels).float().mean().item()
    top5 = (predictions == test_labels[:, None]).any(dim=1).float().mean().item()
    return {"top1": 100 * top1, "top5": 100 * top5}
