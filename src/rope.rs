//! Rotary position embedding frequencies, computed exactly as transformers
//! does (in f32), so the CPU reference and the kernels rotate by the same
//! angles as the truth. The angle for dimension pair i at position p is the
//! f32 product `p * inv_freq[i]`.

/// `1 / theta^(2i / head_dim)` for i in 0..head_dim/2, in f32 arithmetic.
pub fn inverse_frequencies(theta: f64, head_dim: usize) -> Vec<f32> {
    let base = theta as f32;
    (0..head_dim / 2)
        .map(|i| 1.0f32 / base.powf((2 * i) as f32 / head_dim as f32))
        .collect()
}

/// Rotates one head in place, rotate-half layout: dim d pairs with d + head_dim/2.
pub fn apply(head: &mut [f32], inv_freq: &[f32], position: usize) {
    let half = head.len() / 2;
    for (i, &freq) in inv_freq.iter().enumerate().take(half) {
        let angle = position as f32 * freq;
        let (sin, cos) = (f64::from(angle).sin() as f32, f64::from(angle).cos() as f32);
        let (lo, hi) = (head[i], head[i + half]);
        head[i] = lo * cos - hi * sin;
        head[i + half] = hi * cos + lo * sin;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen3_frequencies_use_theta_from_config() {
        let f = inverse_frequencies(1e6, 128);
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        // theta^(-2*63/128) with theta = 1e6, not 1e4.
        let last = 1e6f64.powf(-126.0 / 128.0);
        assert!(
            (f64::from(f[63]) - last).abs() / last < 1e-6,
            "{} vs {last}",
            f[63]
        );
        assert!(f[63] < 2e-6, "theta 1e4 would give 1.15e-4");
    }

    #[test]
    fn rotation_preserves_norm_and_pairs_halves() {
        let f = inverse_frequencies(1e6, 8);
        let mut v = [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        apply(&mut v, &f, 1);
        // dim 0 pairs with dim 4: (cos 1, 0, 0, 0, sin 1, 0, 0, 0)
        assert!((v[0] - 1f32.cos()).abs() < 1e-7);
        assert!((v[4] - 1f32.sin()).abs() < 1e-7);
        let norm: f32 = v.iter().map(|x| x * x).sum();
        assert!((norm - 1.0).abs() < 1e-6);
    }
}
