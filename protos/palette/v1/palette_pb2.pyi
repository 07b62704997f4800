from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_WEBP: _ClassVar[ImageFormat]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_WEBP: ImageFormat

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "num_images", "seed", "top_k", "top_p", "temperature", "condition_scale", "rank", "format", "quality", "preview_every")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    CONDITION_SCALE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_EVERY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    num_images: int
    seed: int
    top_k: int
    top_p: float
    temperature: float
    condition_scale: float
    rank: bool
    format: ImageFormat
    quality: int
    preview_every: int
    def __init__(self, prompt: _Optional[str] = ..., num_images: _Optional[int] = ..., seed: _Optional[int] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., temperature: _Optional[float] = ..., condition_scale: _Optional[float] = ..., rank: _Optional[bool] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., quality: _Optional[int] = ..., preview_every: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("progress", "preview", "image", "done")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    preview: Preview
    image: Image
    done: Done
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., done: _Optional[_Union[Done, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("tokens_done", "tokens_total", "images_sampled", "images_queued")
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IMAGES_SAMPLED_FIELD_NUMBER: _ClassVar[int]
    IMAGES_QUEUED_FIELD_NUMBER: _ClassVar[int]
    tokens_done: int
    tokens_total: int
    images_sampled: int
    images_queued: int
    def __init__(self, tokens_done: _Optional[int] = ..., tokens_total: _Optional[int] = ..., images_sampled: _Optional[int] = ..., images_queued: _Optional[int] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("index", "tokens_done", "data", "mime_type", "width", "height")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKENS_DONE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    index: int
    tokens_done: int
    data: bytes
    mime_type: str
    width: int
    height: int
    def __init__(self, index: _Optional[int] = ..., tokens_done: _Optional[int] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("index", "seed", "data", "mime_type", "width", "height", "score", "has_score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MIME_TYPE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    HAS_SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    seed: int
    data: bytes
    mime_type: str
    width: int
    height: int
    score: float
    has_score: bool
    def __init__(self, index: _Optional[int] = ..., seed: _Optional[int] = ..., data: _Optional[bytes] = ..., mime_type: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., score: _Optional[float] = ..., has_score: _Optional[bool] = ...) -> None: ...

class Done(_message.Message):
    __slots__ = ("ranked_indices", "queue_ms", "sampling_ms", "decode_ms", "rank_ms", "time_to_first_image_ms", "total_ms", "request_id")
    RANKED_INDICES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_MS_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_FIELD_NUMBER: _ClassVar[int]
    RANK_MS_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_IMAGE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ranked_indices: _containers.RepeatedScalarFieldContainer[int]
    queue_ms: float
    sampling_ms: float
    decode_ms: float
    rank_ms: float
    time_to_first_image_ms: float
    total_ms: float
    request_id: str
    def __init__(self, ranked_indices: _Optional[_Iterable[int]] = ..., queue_ms: _Optional[float] = ..., sampling_ms: _Optional[float] = ..., decode_ms: _Optional[float] = ..., rank_ms: _Optional[float] = ..., time_to_first_image_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class RankRequest(_message.Message):
    __slots__ = ("prompt", "image")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    image: bytes
    def __init__(self, prompt: _Optional[str] = ..., image: _Optional[bytes] = ...) -> None: ...

class RankResponse(_message.Message):
    __slots__ = ("score", "done")
    SCORE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    score: Score
    done: RankDone
    def __init__(self, score: _Optional[_Union[Score, _Mapping]] = ..., done: _Optional[_Union[RankDone, _Mapping]] = ...) -> None: ...

class Score(_message.Message):
    __slots__ = ("index", "score")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ...) -> None: ...

class RankDone(_message.Message):
    __slots__ = ("ranked_indices", "total_ms", "request_id")
    RANKED_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ranked_indices: _containers.RepeatedScalarFieldContainer[int]
    total_ms: float
    request_id: str
    def __init__(self, ranked_indices: _Optional[_Iterable[int]] = ..., total_ms: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class RankImagesRequest(_message.Message):
    __slots__ = ("prompt", "images")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    images: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, prompt: _Optional[str] = ..., images: _Optional[_Iterable[bytes]] = ...) -> None: ...

class RankImagesResponse(_message.Message):
    __slots__ = ("scores", "ranked_indices", "total_ms", "request_id")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    RANKED_INDICES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[Score]
    ranked_indices: _containers.RepeatedScalarFieldContainer[int]
    total_ms: float
    request_id: str
    def __init__(self, scores: _Optional[_Iterable[_Union[Score, _Mapping]]] = ..., ranked_indices: _Optional[_Iterable[int]] = ..., total_ms: _Optional[float] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("stages", "devices", "limits", "has_ranker", "config_path", "server_version")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    HAS_RANKER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_PATH_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    devices: _containers.RepeatedScalarFieldContainer[str]
    limits: Limits
    has_ranker: bool
    config_path: str
    server_version: str
    def __init__(self, stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., devices: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., has_ranker: _Optional[bool] = ..., config_path: _Optional[str] = ..., server_version: _Optional[str] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("name", "kind", "type", "checkpoint", "dtype", "consumes", "produces")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    CONSUMES_FIELD_NUMBER: _ClassVar[int]
    PRODUCES_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    type: str
    checkpoint: str
    dtype: str
    consumes: _containers.RepeatedScalarFieldContainer[str]
    produces: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., type: _Optional[str] = ..., checkpoint: _Optional[str] = ..., dtype: _Optional[str] = ..., consumes: _Optional[_Iterable[str]] = ..., produces: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_prompt_chars", "max_prompt_tokens", "max_images_per_request", "num_slots", "image_length", "chunk_steps", "image_width", "image_height", "max_queued_requests", "max_rank_images", "max_rank_image_bytes", "max_rank_image_pixels", "max_top_k", "default_condition_scale", "default_temperature", "max_rank_call_bytes", "max_rank_aspect_ratio", "max_queued_requests_per_caller", "default_top_k")
    MAX_PROMPT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    NUM_SLOTS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    CHUNK_STEPS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CONDITION_SCALE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_CALL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_RANK_ASPECT_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_REQUESTS_PER_CALLER_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    max_prompt_chars: int
    max_prompt_tokens: int
    max_images_per_request: int
    num_slots: int
    image_length: int
    chunk_steps: int
    image_width: int
    image_height: int
    max_queued_requests: int
    max_rank_images: int
    max_rank_image_bytes: int
    max_rank_image_pixels: int
    max_top_k: int
    default_condition_scale: float
    default_temperature: float
    max_rank_call_bytes: int
    max_rank_aspect_ratio: float
    max_queued_requests_per_caller: int
    default_top_k: int
    def __init__(self, max_prompt_chars: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., num_slots: _Optional[int] = ..., image_length: _Optional[int] = ..., chunk_steps: _Optional[int] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., max_queued_requests: _Optional[int] = ..., max_rank_images: _Optional[int] = ..., max_rank_image_bytes: _Optional[int] = ..., max_rank_image_pixels: _Optional[int] = ..., max_top_k: _Optional[int] = ..., default_condition_scale: _Optional[float] = ..., default_temperature: _Optional[float] = ..., max_rank_call_bytes: _Optional[int] = ..., max_rank_aspect_ratio: _Optional[float] = ..., max_queued_requests_per_caller: _Optional[int] = ..., default_top_k: _Optional[int] = ...) -> None: ...
