"""The teacher as a service on its own actors: on-policy methods send token ids, get cache-format targets."""

from pipeline.teacher_service.batching import plan_batches
from pipeline.teacher_service.counters import ServiceCounters
from pipeline.teacher_service.scorer import TeacherScorer
from pipeline.teacher_service.service import (
    ServiceDispatcher,
    TeacherClient,
    TeacherService,
    TeacherServiceConfig,
    start_teacher_service,
)

__all__ = [
    "ServiceCounters",
    "ServiceDispatcher",
    "TeacherClient",
    "TeacherScorer",
    "TeacherService",
    "TeacherServiceConfig",
    "plan_batches",
    "start_teacher_service",
]
