"""Model cards: the zoo's ``MODEL_CARD.md`` and each published repo's ``README.md``, from one template.

The template (``templates/model_card.md``, Jinja) is rendered with huggingface_hub's ``ModelCard.from_template``:
with every ``hub_configs/`` record it is the zoo's card, with one record it is that checkpoint's card.

    sgdrop-zoo model-card --output MODEL_CARD.md     # after adding a file to hub_configs/
"""
from pathlib import Path
from typing import Any, Optional

from huggingface_hub import ModelCard, ModelCardData

__all__ = ['TEMPLATE_PATH', 'render_model_card']

TEMPLATE_PATH = Path(__file__).parent / 'templates' / 'model_card.md'
TAGS = ['image-classification', 'timm', 'sgdrop', 'saliency-guided-dropout']


def render_model_card(records: list[dict[str, Any]], checkpoint: Optional[dict[str, Any]] = None) -> ModelCard:
    """Render the model card template.

    Args:
        records: ``hub_configs/`` records listed in the checkpoint table.
        checkpoint: The record a repo's README describes; None for the zoo's card.
    """
    licenses = sorted({r['license'] for r in records}) or ['apache-2.0']
    card_data = ModelCardData(
        library_name='timm',
        pipeline_tag='image-classification',
        license=licenses[0] if len(licenses) == 1 else 'other',
        tags=TAGS,
        datasets=sorted({r['dataset'] for r in records}) or None,
        base_model=None,
    )
    return ModelCard.from_template(card_data, template_path=str(TEMPLATE_PATH), checkpoints=records,
                                   checkpoint=checkpoint)
