//! The KV cache of one sequence: made by the model (`Model::new_cache`), held by the engine,
//! lent to the model's `forward`.
//! Preallocated to the sequence's capacity and written in place: no concatenation per token.

use candle_core::{DType, Device, Result, Tensor};

/// Keys and values of one attention layer: `(batch, kv_heads, capacity, head_dim)`.
#[derive(Debug)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
}

/// Per-sequence cache over all layers. Not `Clone`: it is written in place, so a copy that
/// shared its tensors would change with the original; [`KvCache::try_clone`] copies them.
#[derive(Debug)]
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
            layers: (0..num_layers).map(|_| None).collect(),
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

    /// An independent copy (keys and values copied on the device).
    pub fn try_clone(&self) -> Result<Self> {
        let layers = self
            .layers
            .iter()
            .map(|l| {
                l.as_ref()
                    .map(|l| {
                        Ok(LayerCache {
                            k: l.k.copy()?,
                            v: l.v.copy()?,
                        })
                    })
                    .transpose()
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            layers,
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            capacity: self.capacity,
            len: self.len,
            dtype: self.dtype,
            device: self.device.clone(),
            rope_delta: self.rope_delta,
            // Written once by prefill and only read after: sharing them is safe.
            cross: self.cross.clone(),
        })
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
        let end = self.len + k.dim(2)?;
        let (ck, cv) = self.reserve(layer, k.dim(2)?)?;
        ck.slice_set(&k.contiguous()?, 2, self.len)?;
        cv.slice_set(&v.contiguous()?, 2, self.len)?;
        Ok((ck.narrow(2, 0, end)?, cv.narrow(2, 0, end)?))
    }

    /// The whole key and value buffers of `layer`, `(1, kv_heads, capacity, head_dim)`,
    /// allocated on first use; kernels that write in place (the fused decode step) take them.
    /// Layer `layer`'s whole key and value caches `(1, kv_heads, capacity, head_dim)`, for a
    /// kernel that writes `new` positions at [`KvCache::len`] itself; fails as
    /// [`KvCache::append`] does when they do not fit.
    pub fn reserve(&mut self, layer: usize, new: usize) -> Result<(Tensor, Tensor)> {
        let end = self.len + new;
        if end > self.capacity {
            candle_core::bail!(
                "KV cache full: {end} positions needed, capacity {}",
                self.capacity
            );
        }
        self.layer(layer)
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// A clone must not see what the original writes afterwards (the caches are written in
    /// place, so sharing tensors would leak one sequence's keys into the other).
    #[test]
    fn try_clone_is_independent_of_the_original() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = KvCache::new(1, 2, 4, 3, DType::F32, &dev);
        let first = Tensor::ones((1, 2, 1, 4), DType::F32, &dev)?;
        cache.append(0, &first, &first)?;
        cache.advance(1);
        let mut copy = cache.try_clone()?;
        let twos = (Tensor::ones((1, 2, 1, 4), DType::F32, &dev)? * 2.0)?;
        cache.append(0, &twos, &twos)?;
        let zeros = Tensor::zeros((1, 2, 1, 4), DType::F32, &dev)?;
        let (k, _) = copy.append(0, &zeros, &zeros)?;
        let k: Vec<f32> = k.flatten_all()?.to_vec1()?;
        // Head 0: position 0 holds ones, position 1 the clone's own zeros, not the original's twos.
        assert_eq!(&k[..8], &[1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(copy.len(), 1);
        Ok(())
    }
}
