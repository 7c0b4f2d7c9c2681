//! The family contract: what one model family gives the registry (a [`Family`] entry with its
//! cheap [`FamilyDefaults`] and a loader) and what a loaded model gives the engine (the
//! [`Model`] trait). Nothing here knows any particular family.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::kv::KvCache;
use crate::error::{Error, Result};
use crate::media::{MediaItem, Modality};
use crate::prompt::{Expansion, PromptStyle, Spliced};

/// One model family: one folder under `models/` and one line in `registry::FAMILIES`.
pub struct Family {
    pub name: &'static str,
    /// `model_type` values this family claims.
    pub model_types: &'static [&'static str],
    /// `architectures` entries this family claims.
    pub architectures: &'static [&'static str],
    /// Short `--model` names for this family's published checkpoints: `(alias, repo id)`.
    pub aliases: &'static [(&'static str, &'static str)],
    /// Cheap facts from `config.json` alone (limits, placeholders, template fallback).
    pub defaults: fn(&serde_json::Value) -> Result<FamilyDefaults>,
    pub load: fn(&LoadContext) -> Result<Box<dyn Model>>,
}

/// What a loader receives: a model directory whose files are all present, its parsed
/// `config.json` (loaders parse this value, never the file again), and where to put weights.
pub struct LoadContext {
    pub dir: PathBuf,
    /// The directories of [`FamilyDefaults::extra_models`], in that order, each with its
    /// `config.json` and weights present.
    pub extra_dirs: Vec<PathBuf>,
    pub config: serde_json::Value,
    pub device: Device,
    pub dtype: DType,
}

impl LoadContext {
    /// A context for a self-contained model directory (no extra models), reading its
    /// `config.json`: for library users and tests that load a family directly.
    pub fn from_dir(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Ok(Self {
            dir: dir.to_path_buf(),
            extra_dirs: Vec::new(),
            config: super::common::files::read_json(&dir.join("config.json"))?,
            device: device.clone(),
            dtype,
        })
    }
}

/// Per-request processor settings, as Hugging Face processors take them as keyword arguments.
/// A family lists the ones it reads in [`FamilyDefaults::processor_kwargs`]; a request that
/// sets any other is refused before weights load.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessorKwargs {
    /// Lower bound of an image's (or frame's) pixel count after resizing.
    pub min_pixels: Option<u64>,
    /// Upper bound of an image's (or frame's) pixel count after resizing.
    pub max_pixels: Option<u64>,
    /// How many images the item's prompt holds (0: not known, taken as 1). Not a user setting
    /// (never in [`ProcessorKwargs::given`]): the app fills it per prompt, because Hugging Face
    /// processors see a prompt's images together (`batch_num_images`) and some tile an image
    /// differently when it is not alone (LLaVA-OneVision).
    pub prompt_images: usize,
    /// MiniCPM-V's `max_slice_nums`: the most slices a high-resolution image is cut into.
    pub max_slice_nums: Option<u64>,
    /// The item's index among its prompt's image items, images and image embeddings alike
    /// (0-based; for other items, the number of image items before it). Not a user setting: the app fills it per item, because some
    /// processors number the images of a prompt (MiniCPM-V 2.6's `<image_id>N</image_id>`).
    pub image_index: usize,
}

impl ProcessorKwargs {
    /// These settings for an item of a prompt whose media are `items`.
    pub fn for_prompt<'a>(&self, items: impl IntoIterator<Item = &'a MediaItem>) -> Self {
        Self {
            prompt_images: items
                .into_iter()
                .filter(|item| matches!(item, MediaItem::Image(_)))
                .count(),
            ..*self
        }
    }

    /// These settings for each item of a prompt whose media are `items`, in order: the
    /// prompt's image count and each item's [`ProcessorKwargs::image_index`].
    pub fn for_items<'a>(
        &self,
        items: impl IntoIterator<Item = &'a MediaItem> + Clone,
    ) -> Vec<Self> {
        let prompt = self.for_prompt(items.clone());
        let mut images = 0;
        items
            .into_iter()
            .map(|item| {
                let k = Self {
                    image_index: images,
                    ..prompt
                };
                images += usize::from(item.modality() == crate::media::Modality::Image);
                k
            })
            .collect()
    }

    /// The names of the user settings given, as the manifest spells them.
    pub fn given(&self) -> Vec<&'static str> {
        [
            ("min_pixels", self.min_pixels.is_some()),
            ("max_pixels", self.max_pixels.is_some()),
            ("max_slice_nums", self.max_slice_nums.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }
}

/// What a family knows from `config.json` alone, used to validate a request before
/// any weights are read. Families fill what they use and take `..Default::default()`.
#[derive(Debug, Clone, Default)]
pub struct FamilyDefaults {
    /// Family name as shown to users (`llava`, `qwen2_vl`, …).
    pub family: &'static str,
    /// Items allowed per prompt, per accepted modality (absent = not accepted).
    pub limits: BTreeMap<Modality, usize>,
    /// Placeholders, fallback chat template and message shape.
    pub prompt: PromptStyle,
    /// Whether `embeds` input is accepted, and for which modality.
    pub embeds: Option<Modality>,
    /// Tensors besides the embeddings that embeds input may carry (`image_grid_thw`).
    pub embeds_tensors: &'static [&'static str],
    /// Width of an embedding row (the language model's hidden size), so embeds of the wrong
    /// width are refused before any weights load.
    pub embeds_hidden: Option<usize>,
    /// Rows of one item's embeddings, where the family fixes it (LLaVA-1.5's 576).
    pub embeds_tokens: Option<usize>,
    /// The language model's positions, where `config.json` gives them: `--dry-run` refuses a
    /// prompt whose text alone is longer.
    pub max_positions: Option<usize>,
    /// The [`ProcessorKwargs`] this family's processors read (`min_pixels`, `max_pixels`).
    pub processor_kwargs: &'static [&'static str],
    /// Other models this one's weights partly come from, named in `config.json` (Ultravox's
    /// `text_model_id`): each an `--model`-style reference, resolved and downloaded like the
    /// model itself, whose directory the loader receives in `LoadContext::extra_dirs`.
    pub extra_models: Vec<ExtraModel>,
}

/// A model another one's `config.json` names for part of its weights.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraModel {
    /// An alias, repo id (`org/name[@revision]`) or directory, as `--model` takes.
    pub reference: String,
    /// The `config.json` key that names it, for error messages (`text_model_id`).
    pub key: &'static str,
}

/// Facts about a loaded model that the engine needs.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    pub hidden_size: usize,
    pub vocab_size: usize,
    /// Maximum positions the language model supports.
    pub max_positions: usize,
}

/// A media item encoded into the language model's hidden space.
#[derive(Debug, Clone)]
pub struct EncodedItem {
    pub expansion: Expansion,
    /// `(slots, hidden_size)` on the model's device and dtype.
    pub features: Tensor,
    /// The item's patch grid, for families whose positions follow it (M-RoPE); `None` for
    /// families whose media tokens take ordinary positions.
    pub grid: Option<ItemGrid>,
}

impl EncodedItem {
    /// Features whose tokens take ordinary positions.
    pub fn new(expansion: Expansion, features: Tensor) -> Self {
        Self {
            expansion,
            features,
            grid: None,
        }
    }

    /// The same, placed on a patch grid (M-RoPE positions).
    pub fn with_grid(self, grid: ItemGrid) -> Self {
        Self {
            grid: Some(grid),
            ..self
        }
    }
}

/// Where a media item's tokens sit in space and time, for multimodal rotary positions.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItemGrid {
    /// `(t, h, w)` in patches (before merging).
    pub grid_thw: [usize; 3],
    /// Temporal position step per temporal patch: 1 for images and Qwen2-VL video;
    /// `tokens_per_second * temporal_patch_size / fps` for Qwen2.5-VL video.
    pub time_interval: f32,
}

/// A loaded model. Object safe: the engine drives any family through it.
///
/// The engine calls [`Model::prefill`] once per sequence and [`Model::decode`] (or
/// [`Model::decode_batch`] for many sequences at once) per generated token. Decoder-only families that splice media features into token embeddings only
/// implement `forward`; families with their own position scheme (M-RoPE) or an encoder whose
/// output is attended to (Whisper) override `prefill`/`decode`.
pub trait Model: Send {
    fn info(&self) -> &ModelInfo;

    /// Preprocesses and encodes one item (or shape-checks precomputed embeds) into
    /// `(slots, hidden)` features, with the tokens that stand for it in the prompt. `kwargs`
    /// holds only settings the family lists in [`FamilyDefaults::processor_kwargs`].
    fn encode_with(&self, item: &MediaItem, kwargs: &ProcessorKwargs) -> Result<EncodedItem>;

    /// [`Model::encode_with`] with the checkpoint's own processor settings.
    fn encode(&self, item: &MediaItem) -> Result<EncodedItem> {
        self.encode_with(item, &ProcessorKwargs::default())
    }

    /// Encodes several items at once (items of different prompts, for batch runs); one
    /// result per item, in order. Families whose encoder can stack same-shaped inputs
    /// override it to run one encoder pass.
    fn encode_batch(&self, items: &[(&MediaItem, &ProcessorKwargs)]) -> Vec<Result<EncodedItem>> {
        items
            .iter()
            .map(|(item, kwargs)| self.encode_with(item, kwargs))
            .collect()
    }

    /// Token embeddings `(ids.len(), hidden)`.
    fn embed_tokens(&self, ids: &[u32]) -> Result<Tensor>;

    /// A cache sized for `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<KvCache>;

    /// Runs the language model over `embeds` `(seq, hidden)` placed after the positions
    /// already in `cache`; returns the logits of the last position `(vocab,)` as f32.
    fn forward(&self, embeds: &Tensor, cache: &mut KvCache) -> Result<Tensor>;

    /// Seconds of each audio item the model reads, when it cuts longer audio (Whisper's and
    /// Qwen2-Audio's 30-second window), so the caller can say so.
    fn audio_window_s(&self) -> Option<f64> {
        None
    }

    /// Families prompted without a chat template (Whisper) build their prompt ids from the
    /// user's text and the encoded items; `None` means render the chat template.
    fn own_prompt(&self, _text: &str, _items: &[EncodedItem]) -> Option<Result<Vec<u32>>> {
        None
    }

    /// Runs the whole prompt: token embeddings with each span replaced by its item's features.
    fn prefill(
        &self,
        prompt: &Spliced,
        items: &[EncodedItem],
        cache: &mut KvCache,
    ) -> Result<Tensor> {
        let embeds = splice_embeddings(self, prompt, items)?;
        self.forward(&embeds, cache)
    }

    /// One generated token.
    fn decode(&self, id: u32, cache: &mut KvCache) -> Result<Tensor> {
        let embeds = self.embed_tokens(&[id])?;
        self.forward(&embeds, cache)
    }

    /// One generated token for each of several sequences at once: `ids[i]` follows the
    /// positions in `caches[i]` (caches may hold different lengths). Returns each sequence's
    /// logits `(vocab,)` as f32, as [`Model::decode`] would. The default loops over the
    /// sequences; families override it to share each weight matmul across the batch.
    fn decode_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Result<Vec<Tensor>> {
        check_batch(ids, caches)?;
        ids.iter()
            .zip(caches.iter_mut())
            .map(|(&id, cache)| self.decode(id, cache))
            .collect()
    }
}

/// One id per cache, at least one of each.
pub fn check_batch(ids: &[u32], caches: &[&mut KvCache]) -> Result<()> {
    if ids.len() != caches.len() || ids.is_empty() {
        return Err(Error::Runtime(anyhow::anyhow!(
            "decode_batch: {} ids for {} caches (expected one id per cache, at least one)",
            ids.len(),
            caches.len()
        )));
    }
    Ok(())
}

/// Input embeddings `(seq, hidden)`: token embeddings with each span replaced by its item's
/// features. The one place where slot and feature counts meet: they must agree.
pub fn splice_embeddings<M: Model + ?Sized>(
    model: &M,
    prompt: &Spliced,
    items: &[EncodedItem],
) -> Result<Tensor> {
    let ids = &prompt.ids;
    let mut pieces = Vec::with_capacity(2 * prompt.spans.len() + 1);
    let mut at = 0;
    for span in &prompt.spans {
        if span.start > at {
            pieces.push(model.embed_tokens(&ids[at..span.start])?);
        }
        let item = items
            .get(span.item)
            .ok_or_else(|| anyhow::anyhow!("no encoded item {} for its prompt span", span.item))?;
        let rows = item.features.dim(0)?;
        if rows != span.len {
            return Err(anyhow::anyhow!(
                "media item {} produced {rows} feature rows for {} prompt slots",
                span.item + 1,
                span.len
            )
            .into());
        }
        pieces.push(item.features.clone());
        at = span.start + span.len;
    }
    if at < ids.len() {
        pieces.push(model.embed_tokens(&ids[at..])?);
    }
    Ok(Tensor::cat(&pieces, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::{RgbImage, Video};

    #[test]
    fn for_prompt_counts_images_and_keeps_the_user_settings() {
        let image = || MediaItem::Image(RgbImage::new(2, 2));
        let video = MediaItem::Video(Video {
            frames: vec![RgbImage::new(2, 2)],
            timestamps: vec![0.0],
            source_fps: 1.0,
            duration: 1.0,
        });
        let user = ProcessorKwargs {
            min_pixels: Some(4),
            ..Default::default()
        };
        let items = [image(), video, image()];
        let k = user.for_prompt(&items);
        assert_eq!(k.prompt_images, 2);
        assert_eq!((k.min_pixels, k.max_pixels), (Some(4), None));
        // Not a user setting: never reported as given.
        assert_eq!(k.given(), ["min_pixels"]);
        assert_eq!(user.for_prompt(&[]).prompt_images, 0);
        let each = user.for_items(&items);
        let index: Vec<usize> = each.iter().map(|k| k.image_index).collect();
        assert_eq!(index, [0, 1, 1]);
        assert!(each
            .iter()
            .all(|k| k.prompt_images == 2 && k.given() == ["min_pixels"]));
    }
}
