//! Image operations computed as Pillow computes them, so that the image tasks give
//! diffusers-workflow's pixels: `Image.resize` with its bilinear, bicubic and Lanczos
//! filters (two separable passes with 22-bit fixed-point coefficients and round-half-up
//! sums, as in Pillow 13's `Resample.c`) and `Image.crop` with a float box
//! (each edge rounded half to even, as Python's `round`); and OpenCV's `cv2.Canny` with
//! its defaults (3x3 Sobel with replicated borders, L1 gradient, the strongest channel of
//! a colour image, non-maximum suppression on OpenCV's fixed-point angle bins, hysteresis
//! over the 8 neighbours).

use crate::pipelines::RgbImage;

/// An 8-bit image with any number of interleaved channels (3: RGB, 1: grey).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pixels {
    pub width: usize,
    pub height: usize,
    pub channels: usize,
    pub data: Vec<u8>,
}

impl Pixels {
    pub fn from_rgb(image: &RgbImage) -> Self {
        Pixels {
            width: image.width,
            height: image.height,
            channels: 3,
            data: image.pixels.clone(),
        }
    }

    /// As RGB: grey is repeated into three channels.
    pub fn into_rgb(self) -> RgbImage {
        let pixels = match self.channels {
            1 => self.data.iter().flat_map(|&v| [v, v, v]).collect(),
            _ => self.data,
        };
        RgbImage {
            width: self.width,
            height: self.height,
            pixels,
        }
    }

    /// A blank image of one colour.
    pub fn filled(width: usize, height: usize, channels: usize, value: u8) -> Self {
        Pixels {
            width,
            height,
            channels,
            data: vec![value; width * height * channels],
        }
    }

    fn at(&self, x: usize, y: usize) -> usize {
        (y * self.width + x) * self.channels
    }

    /// `Image.crop` with whole-pixel bounds; outside the image is black, as Pillow fills it.
    pub fn crop(&self, left: i64, top: i64, right: i64, bottom: i64) -> Pixels {
        let width = (right - left).max(0) as usize;
        let height = (bottom - top).max(0) as usize;
        let mut out = Pixels::filled(width, height, self.channels, 0);
        for y in 0..height {
            let sy = top + y as i64;
            if sy < 0 || sy >= self.height as i64 {
                continue;
            }
            for x in 0..width {
                let sx = left + x as i64;
                if sx < 0 || sx >= self.width as i64 {
                    continue;
                }
                let (from, to) = (self.at(sx as usize, sy as usize), out.at(x, y));
                out.data[to..to + self.channels]
                    .copy_from_slice(&self.data[from..from + self.channels]);
            }
        }
        out
    }

    /// `Image.crop` with a float box, each edge rounded as Python's `round` does.
    pub fn crop_rounded(&self, left: f64, top: f64, right: f64, bottom: f64) -> Pixels {
        let r = |v: f64| v.round_ties_even() as i64;
        self.crop(r(left), r(top), r(right), r(bottom))
    }

    /// `Image.paste(other, (left, top))`.
    pub fn paste(&mut self, other: &Pixels, left: usize, top: usize) {
        for y in 0..other.height {
            for x in 0..other.width {
                let (tx, ty) = (left + x, top + y);
                if tx >= self.width || ty >= self.height {
                    continue;
                }
                let (from, to) = (other.at(x, y), self.at(tx, ty));
                self.data[to..to + self.channels]
                    .copy_from_slice(&other.data[from..from + self.channels]);
            }
        }
    }

    /// `Image.resize((width, height), filter)`, as Pillow 13 computes it: one pass per axis
    /// that changes, the vertical one first when the height shrinks by more than twice as
    /// much as the width (earlier Pillows always start with the horizontal pass).
    pub fn resize(&self, width: usize, height: usize, filter: Filter) -> Pixels {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let horizontal = coefficients(self.width, width, filter);
        let vertical = coefficients(self.height, height, filter);
        let shrink_h = self.height as i64 - height as i64;
        let shrink_w = self.width as i64 - width as i64;
        if shrink_h > 0 && shrink_h > 2 * shrink_w {
            let image = resample_columns(self, &vertical);
            return match width == self.width {
                true => image,
                false => resample_rows(&image, &horizontal, 0, height),
            };
        }
        let mut image = self.clone();
        let mut vertical = vertical;
        if width != self.width {
            // Only the rows the vertical pass reads are resampled, as Pillow does.
            let first = vertical.bounds.first().map_or(0, |b| b.0);
            let last = vertical.bounds.last().map_or(0, |b| b.0 + b.1);
            for bound in &mut vertical.bounds {
                bound.0 -= first;
            }
            image = resample_rows(&image, &horizontal, first, last);
        }
        if height != self.height {
            image = resample_columns(&image, &vertical);
        }
        image
    }
}

/// Pillow's resampling filters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    Bilinear,
    Bicubic,
    Lanczos,
}

impl Filter {
    fn support(self) -> f64 {
        match self {
            Filter::Bilinear => 1.0,
            Filter::Bicubic => 2.0,
            Filter::Lanczos => 3.0,
        }
    }

    fn weight(self, x: f64) -> f64 {
        match self {
            Filter::Bilinear => {
                let x = x.abs();
                if x < 1.0 {
                    1.0 - x
                } else {
                    0.0
                }
            }
            Filter::Bicubic => {
                let a = -0.5;
                let x = x.abs();
                if x < 1.0 {
                    ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
                } else if x < 2.0 {
                    (((x - 5.0) * x + 8.0) * x - 4.0) * a
                } else {
                    0.0
                }
            }
            Filter::Lanczos => {
                if (-3.0..3.0).contains(&x) {
                    sinc(x) * sinc(x / 3.0)
                } else {
                    0.0
                }
            }
        }
    }
}

fn sinc(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output pixel: the first input pixel, how many are read, and their fixed-point
/// weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    weights: Vec<Vec<i32>>,
}

fn coefficients(in_size: usize, out_size: usize, filter: Filter) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filter.support() * filterscale;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = Vec::with_capacity(out_size);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let count = xmax.saturating_sub(xmin);
        let raw: Vec<f64> = (0..count)
            .map(|x| filter.weight((x as f64 + xmin as f64 - center + 0.5) / filterscale))
            .collect();
        let total: f64 = raw.iter().sum();
        let fixed = raw
            .iter()
            .map(|&w| {
                let w = if total != 0.0 { w / total } else { w };
                let scaled = w * f64::from(1u32 << PRECISION_BITS);
                if w < 0.0 {
                    (scaled - 0.5) as i32
                } else {
                    (scaled + 0.5) as i32
                }
            })
            .collect();
        bounds.push((xmin, count));
        weights.push(fixed);
    }
    Coefficients { bounds, weights }
}

fn clip8(sum: i64) -> u8 {
    (sum >> PRECISION_BITS).clamp(0, 255) as u8
}

/// The horizontal pass over rows `first..last`.
fn resample_rows(image: &Pixels, k: &Coefficients, first: usize, last: usize) -> Pixels {
    let width = k.bounds.len();
    let mut out = Pixels::filled(width, last - first, image.channels, 0);
    for y in 0..last - first {
        for (xx, ((xmin, _), weights)) in k.bounds.iter().zip(&k.weights).enumerate() {
            for c in 0..image.channels {
                let mut sum: i64 = 1 << (PRECISION_BITS - 1);
                for (x, weight) in weights.iter().enumerate() {
                    let v = image.data[image.at(xmin + x, y + first) + c];
                    sum += i64::from(v) * i64::from(*weight);
                }
                let at = out.at(xx, y) + c;
                out.data[at] = clip8(sum);
            }
        }
    }
    out
}

/// The vertical pass.
fn resample_columns(image: &Pixels, k: &Coefficients) -> Pixels {
    let height = k.bounds.len();
    let mut out = Pixels::filled(image.width, height, image.channels, 0);
    for (yy, ((ymin, _), weights)) in k.bounds.iter().zip(&k.weights).enumerate() {
        for x in 0..image.width {
            for c in 0..image.channels {
                let mut sum: i64 = 1 << (PRECISION_BITS - 1);
                for (y, weight) in weights.iter().enumerate() {
                    let v = image.data[image.at(x, ymin + y) + c];
                    sum += i64::from(v) * i64::from(*weight);
                }
                let at = out.at(x, yy) + c;
                out.data[at] = clip8(sum);
            }
        }
    }
    out
}

/// `tan(22.5°)` in OpenCV's 15-bit fixed point.
const TG22: i64 = 13573;
const CANNY_SHIFT: u32 = 15;

/// `cv2.Canny(image, low, high)`: 255 on edges, 0 elsewhere, one channel.
pub fn canny(image: &Pixels, low: f64, high: f64) -> Pixels {
    let (low, high) = {
        let (a, b) = (low.floor() as i64, high.floor() as i64);
        (a.min(b), a.max(b))
    };
    let (dx, dy, magnitude) = gradients(image);
    let (w, h) = (image.width, image.height);
    let mag = |x: i64, y: i64| -> i64 {
        if x < 0 || y < 0 || x >= w as i64 || y >= h as i64 {
            0
        } else {
            magnitude[y as usize * w + x as usize]
        }
    };
    // 0: may be an edge, 1: not an edge, 2: an edge.
    let mut map = vec![1u8; w * h];
    let mut stack = Vec::new();
    for y in 0..h as i64 {
        for x in 0..w as i64 {
            let at = y as usize * w + x as usize;
            let m = magnitude[at];
            if m <= low || !is_local_maximum(m, dx[at], dy[at], x, y, &mag) {
                continue;
            }
            if m > high {
                map[at] = 2;
                stack.push(at);
            } else {
                map[at] = 0;
            }
        }
    }
    while let Some(at) = stack.pop() {
        let (x, y) = ((at % w) as i64, (at / w) as i64);
        for (nx, ny) in (-1..=1).flat_map(|oy| (-1..=1).map(move |ox| (x + ox, y + oy))) {
            if nx < 0 || ny < 0 || nx >= w as i64 || ny >= h as i64 {
                continue;
            }
            let next = ny as usize * w + nx as usize;
            if map[next] == 0 {
                map[next] = 2;
                stack.push(next);
            }
        }
    }
    Pixels {
        width: w,
        height: h,
        channels: 1,
        data: map.iter().map(|&v| if v == 2 { 255 } else { 0 }).collect(),
    }
}

/// Non-maximum suppression along the gradient, in OpenCV's fixed-point bins.
fn is_local_maximum(
    m: i64,
    dx: i64,
    dy: i64,
    x: i64,
    y: i64,
    mag: &dyn Fn(i64, i64) -> i64,
) -> bool {
    let (xs, ys) = (dx.abs(), dy.abs());
    let tg22x = xs * TG22;
    let yshift = ys << CANNY_SHIFT;
    if yshift < tg22x {
        return m > mag(x - 1, y) && m >= mag(x + 1, y);
    }
    let tg67x = tg22x + (xs << (CANNY_SHIFT + 1));
    if yshift > tg67x {
        return m > mag(x, y - 1) && m >= mag(x, y + 1);
    }
    let s = if (dx ^ dy) < 0 { -1 } else { 1 };
    m > mag(x - s, y - 1) && m > mag(x + s, y + 1)
}

/// 3x3 Sobel derivatives with replicated borders and their L1 magnitude, taken from the
/// channel whose magnitude is largest (the first on a tie).
fn gradients(image: &Pixels) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
    let (w, h, c) = (image.width as i64, image.height as i64, image.channels);
    let value = |x: i64, y: i64, ch: usize| -> i64 {
        let (x, y) = (x.clamp(0, w - 1), y.clamp(0, h - 1));
        i64::from(image.data[(y * w + x) as usize * c + ch])
    };
    let count = image.width * image.height;
    let (mut dx, mut dy, mut magnitude) = (vec![0; count], vec![0; count], vec![0; count]);
    for y in 0..h {
        for x in 0..w {
            let at = (y * w + x) as usize;
            for ch in 0..c {
                let p = |ox: i64, oy: i64| value(x + ox, y + oy, ch);
                let gx = (p(1, -1) + 2 * p(1, 0) + p(1, 1)) - (p(-1, -1) + 2 * p(-1, 0) + p(-1, 1));
                let gy = (p(-1, 1) + 2 * p(0, 1) + p(1, 1)) - (p(-1, -1) + 2 * p(0, -1) + p(1, -1));
                let m = gx.abs() + gy.abs();
                if ch == 0 || m > magnitude[at] {
                    (dx[at], dy[at], magnitude[at]) = (gx, gy, m);
                }
            }
        }
    }
    (dx, dy, magnitude)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canny_finds_the_edge_of_a_square_and_nothing_in_flat_areas() {
        let mut image = Pixels::filled(16, 16, 3, 0);
        image.paste(&Pixels::filled(8, 8, 3, 255), 4, 4);
        let edges = canny(&image, 100.0, 200.0);
        assert_eq!(edges.data[0], 0);
        assert_eq!(edges.data[8 * 16 + 8], 0, "inside the square");
        let on_edge = (0..16).filter(|&x| edges.data[8 * 16 + x] == 255).count();
        assert!((1..=4).contains(&on_edge), "{on_edge}");
    }

    #[test]
    fn weights_of_every_output_pixel_sum_to_one_in_fixed_point() {
        for filter in [Filter::Bilinear, Filter::Bicubic, Filter::Lanczos] {
            for (from, to) in [(77, 64), (50, 100), (61, 7)] {
                let k = coefficients(from, to, filter);
                for weights in &k.weights {
                    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
                    assert!((total - (1 << PRECISION_BITS)).abs() <= weights.len() as i64);
                }
            }
        }
    }

    #[test]
    fn a_flat_image_stays_flat_and_crop_rounds_half_to_even() {
        let flat = Pixels::filled(9, 7, 3, 200);
        let resized = flat.resize(20, 3, Filter::Lanczos);
        assert!(resized.data.iter().all(|&v| v == 200));
        let image = Pixels {
            width: 4,
            height: 1,
            channels: 1,
            data: vec![1, 2, 3, 4],
        };
        // round(0.5) = 0 and round(2.5) = 2 in Python.
        assert_eq!(image.crop_rounded(0.5, 0.0, 2.5, 1.0).data, [1, 2]);
        assert_eq!(image.crop_rounded(1.5, 0.0, 3.5, 1.0).data, [3, 4]);
    }
}
