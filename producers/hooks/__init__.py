"""Inbound webhooks: ``POST /hooks/{name}`` verifies a delivery, maps it with the hook's templates, submits a job."""

from difyq.producers.hooks.deliveries import DEFAULT_DELIVERY_TTL_SECONDS, HookDeliveries
from difyq.producers.hooks.mapping import BodyError, MappedJob, MappingError, MissingFieldError, parse_body, render_hook
from difyq.producers.hooks.route import build_hooks_router
from difyq.producers.hooks.verify import SignatureError, verify_delivery

__all__ = [
    "DEFAULT_DELIVERY_TTL_SECONDS",
    "BodyError",
    "HookDeliveries",
    "MappedJob",
    "MappingError",
    "MissingFieldError",
    "SignatureError",
    "build_hooks_router",
    "parse_body",
    "render_hook",
    "verify_delivery",
]
