//! The KV cache, owned by the engine and lent to a model's `forward`.
//! Preallocated to the sequence's capacity and written in place: no concatenation per token.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of one attention layer: `(batch, kv_heads, capacity, head_dim)`.
#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Per-sequence cache over all layers.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    len: usize,
    dtype: DType,
    device: Device,
    /// Offset between cache positions and rotary positions, for position schemes (M-RoPE)
    /// whose next text position is not the cache length; set by the model's prefill.
    pub rope_delta: i64,
    /// Cross-attention keys and values per decoder layer, for encoder-decoder models; set
    /// once by the model's prefill.
    pub cross: Vec<(Tensor, Tensor)>,
}

impl KvCache {
    pub fn new(
        num_layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self {
            layers: vec![None; num_layers],
            kv_heads,
            head_dim,
            capacity,
            len: 0,
            dtype,
            device: device.clone(),
            rope_delta: 0,
            cross: Vec::new(),
        }
    }

    /// Number of positions already cached (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes of keys and values one position takes over all layers.
    pub fn bytes_per_position(&self) -> usize {
        2 * self.layers.len() * self.kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }

    /// Writes `k`, `v` of shape `(1, kv_heads, new, head_dim)` for `layer` at the current
    /// position and returns all keys and values cached so far including them.
    /// Call [`KvCache::advance`] once per forward, after the last layer.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let new = k.dim(2)?;
        let end = self.len + new;
        if end > self.capacity {
            candle_core::bail!(
                "KV cache full: {end} positions needed, capacity {}",
                self.capacity
            );
        }
        let (ck, cv) = self.layer(layer)?;
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((ck.narrow(2, 0, end)?, cv.narrow(2, 0, end)?))
    }

    /// The whole key and value buffers of `layer`, `(1, kv_heads, capacity, head_dim)`,
    /// allocated on first use; kernels that write in place (the fused decode step) take them.
    pub fn layer(&mut self, layer: usize) -> Result<(Tensor, Tensor)> {
        let entry = match &mut self.layers[layer] {
            Some(entry) => entry,
            slot => {
                let shape = (1, self.kv_heads, self.capacity, self.head_dim);
                *slot = Some(LayerCache {
                    k: Tensor::zeros(shape, self.dtype, &self.device)?,
                    v: Tensor::zeros(shape, self.dtype, &self.device)?,
                });
                slot.as_mut().expect("just set")
            }
        };
        Ok((entry.k.clone(), entry.v.clone()))
    }

    /// Marks `new` positions as written by the forward that just ran.
    pub fn advance(&mut self, new: usize) {
        self.len += new;
    }
}
