//! The CLIP ViT vision tower (as `CLIPVisionModel` in transformers): patch embedding, class
//! embedding, learned positions, `pre_layrnorm`, pre-norm encoder layers. Returns the hidden
//! states a caller selects (`hidden_states[i]` with HF's numbering: 0 is the embedding output
//! after `pre_layrnorm`, `i` the output of layer `i`). Knows no LLM and no preprocessing.
//!
//! The same tower also runs SigLIP (`SiglipVisionModel`): the same encoder layers, but a biased
//! patch convolution, no class token and no `pre_layrnorm` ([`ClipVisionTower::load_siglip`],
//! configured by [`siglip_config`]). Its `post_layernorm` and pooling head are not loaded:
//! `hidden_states` stop before them, as in transformers.

use candle_core::{DType, Module, Tensor};
use candle_nn::{layer_norm, linear_b, LayerNorm, LayerNormConfig, Linear, VarBuilder};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::kernels;
// Projections with the bias in one pass on CUDA.
use crate::kernels::cpu::linear;

/// A `SiglipVisionConfig` (`config.json`'s `vision_config`) as the tower's config, with
/// transformers' SigLIP defaults for missing keys.
pub fn siglip_config(value: &serde_json::Value) -> Result<ClipVisionConfig> {
    let mut merged = serde_json::json!({
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
        "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 16,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6,
    });
    if let (Some(out), Some(given)) = (merged.as_object_mut(), value.as_object()) {
        out.extend(given.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    let cfg: ClipVisionConfig = serde_json::from_value(merged).map_err(|e| {
        Error::input(
            "config.json",
            format!("vision_config: {e}"),
            "a SigLIP vision config",
        )
    })?;
    cfg.validate(true)?;
    Ok(cfg)
}

/// `CLIPVisionConfig` with transformers' defaults for missing keys.
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "defaults::hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "defaults::intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "defaults::num_hidden_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "defaults::num_attention_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "defaults::num_channels")]
    pub num_channels: usize,
    #[serde(default = "defaults::image_size")]
    pub image_size: usize,
    #[serde(default = "defaults::patch_size")]
    pub patch_size: usize,
    #[serde(default = "defaults::hidden_act")]
    pub hidden_act: String,
    #[serde(default = "defaults::layer_norm_eps")]
    pub layer_norm_eps: f64,
}

mod defaults {
    pub fn hidden_size() -> usize {
        768
    }
    pub fn intermediate_size() -> usize {
        3072
    }
    pub fn num_hidden_layers() -> usize {
        12
    }
    pub fn num_attention_heads() -> usize {
        12
    }
    pub fn num_channels() -> usize {
        3
    }
    pub fn image_size() -> usize {
        224
    }
    pub fn patch_size() -> usize {
        32
    }
    pub fn hidden_act() -> String {
        "quick_gelu".into()
    }
    pub fn layer_norm_eps() -> f64 {
        1e-5
    }
}

impl ClipVisionConfig {
    /// Patches per side; the image size must be a multiple of the patch size.
    pub fn grid(&self) -> Result<usize> {
        if self.patch_size == 0 || !self.image_size.is_multiple_of(self.patch_size) {
            return Err(Error::input(
                "config.json",
                format!(
                    "vision_config.image_size {} is not a multiple of patch_size {}",
                    self.image_size, self.patch_size
                ),
                "image_size divisible by a non-zero patch_size",
            ));
        }
        Ok(self.image_size / self.patch_size)
    }

    /// Patch tokens per image (without the class token).
    pub fn num_patches(&self) -> Result<usize> {
        let g = self.grid()?;
        Ok(g * g)
    }

    /// Patches per side of SigLIP's "valid" patch convolution, which drops the pixels past the
    /// last whole patch (384 px in patches of 14: 27 per side).
    pub fn valid_grid(&self) -> Result<usize> {
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return Err(Error::input(
                "config.json",
                format!(
                    "vision_config.image_size {} is smaller than patch_size {}",
                    self.image_size, self.patch_size
                ),
                "a non-zero patch_size no larger than image_size",
            ));
        }
        Ok(self.image_size / self.patch_size)
    }

    fn validate(&self, siglip: bool) -> Result<()> {
        if siglip {
            self.valid_grid()?;
        } else {
            self.grid()?;
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::input(
                "config.json",
                format!(
                    "vision_config.hidden_size {} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
                "hidden_size divisible by num_attention_heads",
            ));
        }
        Activation::parse(&self.hidden_act)?;
        Ok(())
    }
}

/// Activations CLIP checkpoints use.
#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    Gelu,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Result<Self> {
        match name {
            "quick_gelu" => Ok(Self::QuickGelu),
            "gelu" => Ok(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" => Ok(Self::GeluTanh),
            other => Err(Error::input(
                "config.json",
                format!("unsupported vision_config.hidden_act {other:?}"),
                "quick_gelu, gelu, gelu_new or gelu_pytorch_tanh",
            )),
        }
    }

    fn apply(self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            // x * sigmoid(1.702 x), as transformers' QuickGELUActivation.
            Self::QuickGelu => kernels::quick_gelu(xs),
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
    head_dim: usize,
    scale: f64,
}

impl Attention {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let h = cfg.hidden_size;
        let head_dim = h / cfg.num_attention_heads;
        Ok(Self {
            q: linear_b(h, h, true, vb.pp("q_proj"))?,
            k: linear_b(h, h, true, vb.pp("k_proj"))?,
            v: linear_b(h, h, true, vb.pp("v_proj"))?,
            out: linear_b(h, h, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, h) = xs.dims3()?;
        // (b, heads, t, head_dim) views of the projections.
        let heads = |x: Tensor| -> candle_core::Result<Tensor> {
            x.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = heads(linear(&self.q, xs)?)?;
        let k = heads(linear(&self.k, xs)?)?;
        let v = heads(linear(&self.v, xs)?)?;
        let out = if kernels::flash_attention_supported(xs.device(), xs.dtype(), self.head_dim) {
            // Strided views in, `(b, t, heads, head_dim)` out.
            kernels::flash_attention(&q, &k, &v, None, self.scale as f32)?
        } else {
            let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
            let scores = (q.matmul(&k.t()?)? * self.scale)?;
            // Softmax in f32 then back, as HF's eager attention does.
            let probs = candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?
                .to_dtype(xs.dtype())?;
            probs.matmul(&v)?.transpose(1, 2)?
        };
        linear(&self.out, &out.reshape((b, t, h))?)
    }
}

struct EncoderLayer {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    act: Activation,
}

impl EncoderLayer {
    fn new(cfg: &ClipVisionConfig, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let ln = LayerNormConfig::from(cfg.layer_norm_eps);
        Ok(Self {
            norm1: layer_norm(h, ln, vb.pp("layer_norm1"))?,
            attn: Attention::new(cfg, vb.pp("self_attn"))?,
            norm2: layer_norm(h, ln, vb.pp("layer_norm2"))?,
            fc1: linear_b(h, cfg.intermediate_size, true, vb.pp("mlp").pp("fc1"))?,
            fc2: linear_b(cfg.intermediate_size, h, true, vb.pp("mlp").pp("fc2"))?,
            act: Activation::parse(&cfg.hidden_act)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = (xs + self.attn.forward(&self.norm1.forward(xs)?)?)?;
        let hidden = linear(&self.fc1, &self.norm2.forward(&xs)?)?;
        kernels::linear_residual(&self.fc2, &self.act.apply(&hidden)?, &xs)
    }
}

/// A loaded CLIP (or SigLIP) vision tower. Only the layers a caller needs are loaded and run.
pub struct ClipVisionTower {
    cfg: ClipVisionConfig,
    /// Patch convolution as a matrix `(hidden, channels * patch * patch)`.
    patch_weight: Tensor,
    /// SigLIP's patch convolution has a bias; CLIP's has none.
    patch_bias: Option<Tensor>,
    /// CLIP's class token; SigLIP has none.
    class_embedding: Option<Tensor>,
    position_embedding: Tensor,
    /// CLIP normalises the embeddings before the encoder; SigLIP does not.
    pre_layrnorm: Option<LayerNorm>,
    layers: Vec<EncoderLayer>,
}

impl ClipVisionTower {
    /// Loads the embeddings, `pre_layrnorm` and the first `layers` encoder layers from `vb`
    /// (the prefix holding `embeddings.*`, `pre_layrnorm.*`, `encoder.layers.*`).
    pub fn load(cfg: &ClipVisionConfig, layers: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_kind(cfg, layers, vb, false)
    }

    /// Loads a SigLIP tower's embeddings and first `layers` encoder layers from `vb` (the
    /// prefix holding `embeddings.*` and `encoder.layers.*`).
    pub fn load_siglip(cfg: &ClipVisionConfig, layers: usize, vb: VarBuilder) -> Result<Self> {
        Self::load_kind(cfg, layers, vb, true)
    }

    fn load_kind(
        cfg: &ClipVisionConfig,
        layers: usize,
        vb: VarBuilder,
        siglip: bool,
    ) -> Result<Self> {
        cfg.validate(siglip)?;
        if layers > cfg.num_hidden_layers {
            return Err(Error::input(
                "config.json",
                format!(
                    "{layers} vision layers requested, the tower has {}",
                    cfg.num_hidden_layers
                ),
                "a vision_feature_layer within the vision tower",
            ));
        }
        let h = cfg.hidden_size;
        let p = cfg.patch_size;
        let emb = vb.pp("embeddings");
        let patch_weight = emb
            .get((h, cfg.num_channels, p, p), "patch_embedding.weight")?
            .reshape((h, cfg.num_channels * p * p))?;
        let grid = if siglip {
            cfg.valid_grid()?
        } else {
            cfg.grid()?
        };
        let positions = grid * grid + usize::from(!siglip);
        let (patch_bias, class_embedding, pre_layrnorm) = if siglip {
            (Some(emb.get(h, "patch_embedding.bias")?), None, None)
        } else {
            let ln = LayerNormConfig::from(cfg.layer_norm_eps);
            (
                None,
                Some(emb.get(h, "class_embedding")?),
                Some(layer_norm(h, ln, vb.pp("pre_layrnorm"))?),
            )
        };
        Ok(Self {
            cfg: cfg.clone(),
            patch_weight,
            patch_bias,
            class_embedding,
            position_embedding: emb.get((positions, h), "position_embedding.weight")?,
            pre_layrnorm,
            layers: (0..layers)
                .map(|i| EncoderLayer::new(cfg, vb.pp("encoder").pp("layers").pp(i)))
                .collect::<Result<_>>()?,
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.cfg
    }

    /// Runs a SigLIP tower the navit way (MiniCPM-V): one image of any size `(1, C, H, W)`,
    /// `H` and `W` multiples of the patch size, whose patches (row-major) take the rows
    /// `position_ids` `(patches,)` of the position table. Returns the last loaded layer's
    /// output `(1, patches, hidden)`.
    pub fn navit_hidden_state(
        &self,
        pixel_values: &Tensor,
        position_ids: &Tensor,
    ) -> Result<Tensor> {
        let (b, c, hgt, wid) = pixel_values.dims4()?;
        let p = self.cfg.patch_size;
        if b != 1 || c != self.cfg.num_channels || hgt % p != 0 || wid % p != 0 {
            return Err(Error::Runtime(anyhow::anyhow!(
                "navit pixel values of shape {:?} (expected (1, {}, H, W) in whole patches of {p})",
                pixel_values.dims(),
                self.cfg.num_channels
            )));
        }
        let (gh, gw) = (hgt / p, wid / p);
        let dtype = self.patch_weight.dtype();
        let patches = pixel_values
            .to_dtype(dtype)?
            .reshape((c, gh, p, gw, p))?
            .permute((1, 3, 0, 2, 4))?
            .contiguous()?
            .reshape((gh * gw, c * p * p))?;
        let mut xs = patches.matmul(&self.patch_weight.t()?)?;
        if let Some(bias) = &self.patch_bias {
            xs = xs.broadcast_add(bias)?;
        }
        let positions = self.position_embedding.index_select(position_ids, 0)?;
        let mut xs = (xs + positions)?.unsqueeze(0)?;
        for layer in &self.layers {
            xs = layer.forward(&xs)?;
        }
        Ok(xs)
    }

    /// Runs the tower on `pixel_values` `(B, C, S, S)` and returns `hidden_states[i]` for each
    /// requested `i` (HF numbering, `0..=layers loaded`), each `(B, 1 + patches, hidden)` (CLIP)
    /// or `(B, patches, hidden)` (SigLIP).
    pub fn hidden_states(&self, pixel_values: &Tensor, wanted: &[usize]) -> Result<Vec<Tensor>> {
        let (b, c, hgt, wid) = pixel_values.dims4()?;
        let (s, p) = (self.cfg.image_size, self.cfg.patch_size);
        if c != self.cfg.num_channels || hgt != s || wid != s {
            return Err(Error::input(
                "pixel_values",
                format!("shape {:?}", pixel_values.dims()),
                format!("(batch, {}, {s}, {s})", self.cfg.num_channels),
            ));
        }
        let g = s / p;
        let h = self.cfg.hidden_size;
        let dtype = self.patch_weight.dtype();
        // A stride-p, kernel-p convolution is a matmul over flattened patches, with the
        // (channel, row, column) order of the convolution weight; pixels past the last whole
        // patch are not seen (SigLIP's "valid" padding; CLIP sizes are multiples of p).
        let patches = pixel_values
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .to_dtype(dtype)?
            .reshape((b, c, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * g * g, c * p * p))?;
        let mut patch_embeds = patches.matmul(&self.patch_weight.t()?)?;
        if let Some(bias) = &self.patch_bias {
            patch_embeds = patch_embeds.broadcast_add(bias)?;
        }
        let patch_embeds = patch_embeds.reshape((b, g * g, h))?;
        let xs = match &self.class_embedding {
            Some(class) => {
                let cls = class.reshape((1, 1, h))?.repeat((b, 1, 1))?;
                Tensor::cat(&[&cls, &patch_embeds], 1)?
            }
            None => patch_embeds,
        };
        let xs = xs.broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut xs = match &self.pre_layrnorm {
            Some(norm) => norm.forward(&xs)?,
            None => xs,
        };

        let mut out: Vec<Option<Tensor>> = vec![None; wanted.len()];
        let mut store = |i: usize, xs: &Tensor| {
            for (slot, &w) in out.iter_mut().zip(wanted) {
                if w == i {
                    *slot = Some(xs.clone());
                }
            }
        };
        store(0, &xs);
        let last = wanted.iter().copied().max().unwrap_or(0);
        for (i, layer) in self.layers.iter().enumerate().take(last) {
            xs = layer.forward(&xs)?;
            store(i + 1, &xs);
        }
        out.into_iter()
            .zip(wanted)
            .map(|(t, w)| {
                t.ok_or_else(|| {
                    Error::Runtime(anyhow::anyhow!(
                        "vision hidden state {w} requested but only {} layers are loaded",
                        self.layers.len()
                    ))
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_transformers() {
        let cfg: ClipVisionConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(
            (cfg.hidden_size, cfg.image_size, cfg.patch_size),
            (768, 224, 32)
        );
        assert_eq!(cfg.num_patches().unwrap(), 49);
        assert_eq!(cfg.hidden_act, "quick_gelu");
    }

    #[test]
    fn siglip_config_takes_siglip_defaults_and_a_valid_grid() {
        let cfg = siglip_config(&serde_json::json!({"image_size": 384, "patch_size": 14})).unwrap();
        assert_eq!((cfg.hidden_size, cfg.num_hidden_layers), (768, 12));
        assert_eq!(cfg.hidden_act, "gelu_pytorch_tanh");
        assert_eq!(cfg.layer_norm_eps, 1e-6);
        assert_eq!(cfg.valid_grid().unwrap(), 27);
        assert!(siglip_config(&serde_json::json!({"image_size": 10, "patch_size": 14})).is_err());
        assert!(siglip_config(&serde_json::json!({"hidden_act": "tanh_cubed"})).is_err());
    }

    /// SigLIP's "valid" convolution ignores the pixels past the last whole patch (384 px in
    /// patches of 14): a 44 px tower sees exactly what a 42 px one sees of the same image.
    #[test]
    fn siglip_drops_the_pixels_past_the_last_patch() -> Result<()> {
        let dev = candle_core::Device::Cpu;
        let (h, p) = (8, 14);
        let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev);
        let weights = std::collections::HashMap::from([
            (
                "embeddings.patch_embedding.weight".to_string(),
                randn(&[h, 3, p, p])?,
            ),
            ("embeddings.patch_embedding.bias".to_string(), randn(&[h])?),
            (
                "embeddings.position_embedding.weight".to_string(),
                randn(&[9, h])?,
            ),
        ]);
        let tower = |size: usize| -> Result<ClipVisionTower> {
            let cfg = siglip_config(&serde_json::json!({
                "hidden_size": h, "num_attention_heads": 2, "image_size": size, "patch_size": p
            }))?;
            let vb = VarBuilder::from_tensors(weights.clone(), DType::F32, &dev);
            ClipVisionTower::load_siglip(&cfg, 0, vb)
        };
        let pixels = randn(&[1, 3, 44, 44])?;
        let wide = tower(44)?.hidden_states(&pixels, &[0])?.remove(0);
        let cropped = pixels.narrow(2, 0, 42)?.narrow(3, 0, 42)?;
        let exact = tower(42)?.hidden_states(&cropped, &[0])?.remove(0);
        assert_eq!(wide.dims(), [1, 9, h]);
        let diff: f32 = (wide - exact)?.abs()?.max_all()?.to_scalar()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn rejects_image_size_not_multiple_of_patch() {
        let cfg: ClipVisionConfig =
            serde_json::from_str(r#"{"image_size": 330, "patch_size": 14}"#).unwrap();
        assert!(matches!(cfg.num_patches(), Err(Error::Input { .. })));
    }

    #[test]
    fn quick_gelu_is_x_sigmoid_1702x() -> candle_core::Result<()> {
        let x = Tensor::new(&[-2.0f32, 0.0, 1.5], &candle_core::Device::Cpu)?;
        let y: Vec<f32> = Activation::QuickGelu.apply(&x)?.to_vec1()?;
        for (xi, yi) in [-2.0f32, 0.0, 1.5].iter().zip(y) {
            let want = xi / (1.0 + (-1.702 * xi).exp());
            assert!((yi - want).abs() < 1e-6, "{yi} vs {want}");
        }
        Ok(())
    }
}
