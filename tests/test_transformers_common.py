"""transformers' own common tests (`ModelTesterMixin`, `ConfigTester`, `BackboneTesterMixin`) on every ExtreMA class.

The test files come from the source distribution of the installed transformers (see `_transformers_tests.py`); the
module skips, with the reason, when they cannot be had. Run: `python -m pytest tests/test_transformers_common.py -q`.
Every test of the mixins that is skipped here says why: a feature the architecture does not have (token embeddings,
feed-forward chunking) or one the upstream test cannot express for a model that masks its input at random.
"""

import tempfile
import unittest

import pytest
import torch

from _transformers_tests import load

upstream, reason = load()
if upstream is None:
    pytest.skip(reason, allow_module_level=True)

from transformers_upstream_tests.test_backbone_common import BackboneTesterMixin  # noqa: E402
from transformers_upstream_tests.test_configuration_common import ConfigTester  # noqa: E402
from transformers_upstream_tests.test_modeling_common import (  # noqa: E402
    ModelTesterMixin,
    floats_tensor,
    ids_tensor,
)

from configuration_extrema import ExtremaConfig  # noqa: E402
from modeling_extrema import (  # noqa: E402
    ExtremaBackbone,
    ExtremaForImageClassification,
    ExtremaForPreTraining,
    ExtremaModel,
)


@pytest.fixture(autouse=True, scope="module")
def extrema_in_the_task_mappings():
    """The common tests read a class's task (base model: no loss; classifier: give it labels) from the class-name
    mappings transformers keeps for its own models; a model shipped as remote code is not in them, so it is added for
    the duration of this module, as a model inside transformers would be listed."""
    from transformers.models.auto import modeling_auto

    with pytest.MonkeyPatch.context() as patch:
        for mapping, name in (
            ("MODEL_MAPPING_NAMES", "ExtremaModel"),
            ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "ExtremaForImageClassification"),
            ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "ExtremaForPreTraining"),
            ("MODEL_FOR_BACKBONE_MAPPING_NAMES", "ExtremaBackbone"),
        ):
            patch.setitem(getattr(modeling_auto, mapping), "extrema", name)
        yield


class ExtremaModelTester:
    """A tiny ExtreMA: 16 px images of 4 px patches (16 patches), 2 blocks + 2 class-attention blocks, width 32."""

    def __init__(self, parent, batch_size=3, masked=False):
        self.parent = parent
        self.batch_size = batch_size
        self.image_size, self.patch_size, self.num_channels = 16, 4, 3
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = 32, 2, 4
        self.num_labels = 5
        self.is_training = True
        self.masked = masked
        config = self.get_config()
        # the sequence the self-attention blocks see: every patch, or a masked view's visible patches
        self.seq_length = config.num_visible_patches if masked else config.num_patches

    def get_config(self):
        return ExtremaConfig(
            image_size=self.image_size,
            patch_size=self.patch_size,
            num_channels=self.num_channels,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            projector_hidden_size=48,
            projection_dim=16,
            predictor_hidden_size=48,
            mask_ratio=0.75,
            num_masks=2,
            num_labels=self.num_labels,
            out_features=["stage1", "stage2"],
        )

    def prepare_config_and_inputs(self):
        config = self.get_config()
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        labels = ids_tensor([self.batch_size], self.num_labels)
        return config, pixel_values, labels

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values, _ = self.prepare_config_and_inputs()
        inputs = {"pixel_values": pixel_values}
        if self.masked:  # fixed mask noise: the masks are part of the input, so outputs are reproducible
            inputs["noise"] = floats_tensor([self.batch_size, *config.mask_noise_shape])
        return config, inputs


class ExtremaCommonTests(ModelTesterMixin):
    """What both model test cases share: no token embeddings to resize or feed, no feed-forward chunking."""

    test_resize_embeddings = False
    # the upstream test reads a model's age from a copyright line; this file has none, and its init is complete
    test_can_init_all_missing_weights_before_2023 = True

    @unittest.skip(reason="ExtreMA takes pixel_values only; it has no inputs_embeds")
    def test_inputs_embeds(self):
        pass

    @unittest.skip(reason="ExtreMA takes pixel_values only; it has no inputs_embeds")
    def test_inputs_embeds_matches_input_ids(self):
        pass

    @unittest.skip(reason="ExtreMA has no feed-forward chunking")
    def test_feed_forward_chunking(self):
        pass

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model_get_set_embeddings(self):
        """A vision model's input embedding is its patch embedding (a module, not an `nn.Embedding`), as transformers'
        ViT-family tests check it."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        for model_class in self.all_model_classes:
            model = model_class(config)
            self.assertIsInstance(model.get_input_embeddings(), torch.nn.Module)
            self.assertIsNone(model.get_output_embeddings())


class ExtremaModelTest(ExtremaCommonTests, unittest.TestCase):
    all_model_classes = (ExtremaModel, ExtremaForImageClassification)
    pipeline_model_mapping = {"image-feature-extraction": ExtremaModel, "image-classification": ExtremaForImageClassification}

    def setUp(self):
        self.model_tester = ExtremaModelTester(self)
        self.config_tester = ConfigTester(self, config_class=ExtremaConfig, has_text_modality=False, hidden_size=36)


class ExtremaForPreTrainingTest(ExtremaCommonTests, unittest.TestCase):
    """The pre-training model: its student sees masked views (fixed by the `noise` input), so its attention maps and
    hidden states are over the visible patches, one row per masked view (image-major)."""

    all_model_classes = (ExtremaForPreTraining,)

    def setUp(self):
        self.model_tester = ExtremaModelTester(self, masked=True)
        self.config_tester = ConfigTester(self, config_class=ExtremaConfig, has_text_modality=False, hidden_size=36)

    def test_base_model_prefix_loads_base_weights(self):
        """The upstream test assumes one base model per head; this one has two (student and teacher).
        `base_model_prefix` is the teacher, and a base-model folder loads into both: the student starts as its copy."""
        config, _ = self.model_tester.prepare_config_and_inputs_for_common()
        base_model = ExtremaModel(config)
        with tempfile.TemporaryDirectory() as tmp:
            base_model.save_pretrained(tmp)
            model, info = ExtremaForPreTraining.from_pretrained(tmp, output_loading_info=True)
        self.assertEqual(model.base_model_prefix, "teacher")
        self.assertIs(model.base_model, model.teacher)
        for name in ("student", "teacher"):
            for key, tensor in base_model.state_dict().items():
                torch.testing.assert_close(getattr(model, name).state_dict()[key], tensor, atol=0, rtol=0)
            self.assertFalse([key for key in info["missing_keys"] if key.startswith(f"{name}.")])


class ExtremaBackboneTest(BackboneTesterMixin, unittest.TestCase):
    all_model_classes = (ExtremaBackbone,)
    config_class = ExtremaConfig

    def setUp(self):
        self.model_tester = ExtremaModelTester(self)


def test_the_common_tests_ran():
    """The classes above were collected with transformers' tests in them (a guard against an empty mixin)."""
    assert sum(name.startswith("test_") for name in dir(ExtremaModelTest)) > 100
    assert torch.is_tensor(floats_tensor([1]))
