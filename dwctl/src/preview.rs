//! Image previews in the terminal.
//!
//! [`detect`] picks the best way the terminal can draw pixels: the kitty graphics protocol,
//! iTerm2 inline images, sixel, or (everywhere else) Unicode half blocks with 24-bit colours.
//! [`show`] draws an RGB image with it, fitted into a box of terminal cells.
//!
//! Inside tmux the graphics escapes are wrapped in tmux's passthrough sequence, which only
//! works with `set -g allow-passthrough on`; without a recognisable outer terminal, tmux gets
//! half blocks. `DWCTL_PREVIEW=kitty|iterm2|sixel|blocks` overrides detection. A preview
//! is asked for explicitly (`--preview`), so a non-empty `NO_COLOR` does not turn it off:
//! graphics protocols draw the image as they would, and half blocks become grey shades
//! (`░▒▓█`) with no colour escapes at all.

use std::fmt::Write as _;
use std::io::{self, Write};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;

/// How images are drawn in the terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// The kitty graphics protocol (kitty, ghostty).
    Kitty,
    /// iTerm2's inline images (`OSC 1337 ; File=`), also spoken by WezTerm.
    Iterm2,
    /// DEC sixel graphics (foot, mlterm, xterm built with sixel support).
    Sixel,
    /// `▀` characters with 24-bit foreground and background colours: two pixels per cell.
    HalfBlocks,
}

/// The smallest width, in cells, that a small image is enlarged to when there is room.
const MIN_COLS: f64 = 32.0;
/// Cell size in pixels assumed when the terminal does not report one.
const DEFAULT_CELL_PX: (f64, f64) = (10.0, 20.0);
/// Longest side of an iTerm2 image sent through tmux, whose passthrough buffer is limited.
const TMUX_ITERM2_MAX_PX: u32 = 512;
/// Base64 bytes per kitty graphics chunk (the protocol's maximum).
const KITTY_CHUNK: usize = 4096;

/// Detects what the terminal supports, from the process environment.
///
/// See [`detect_from`].
pub fn detect() -> Protocol {
    detect_from(|name| std::env::var(name).ok())
}

/// Detects what the terminal supports from environment variables looked up with `env`.
///
/// `DWCTL_PREVIEW` (kitty, iterm2, sixel, blocks) wins. Otherwise the terminal is recognised
/// by the variables it sets: kitty (`TERM=xterm-kitty`, `KITTY_WINDOW_ID`) and ghostty get
/// the kitty protocol; iTerm2 (`TERM_PROGRAM=iTerm.app`, `LC_TERMINAL=iTerm2`) and WezTerm
/// (whose kitty support is off by default) get iTerm2 images; foot, mlterm and terminals with
/// "sixel" in `TERM` get sixel. Nothing is asked of the terminal, so detection never blocks.
/// Inside tmux (`TMUX` set) `TERM` and `TERM_PROGRAM` describe tmux itself, so only the
/// outer terminal's own variables count, and half blocks are used when there are none.
pub fn detect_from(env: impl Fn(&str) -> Option<String>) -> Protocol {
    let get = |name: &str| env(name).filter(|value| !value.is_empty());
    if let Some(forced) = get("DWCTL_PREVIEW") {
        match forced.trim().to_ascii_lowercase().as_str() {
            "kitty" => return Protocol::Kitty,
            "iterm2" | "iterm" => return Protocol::Iterm2,
            "sixel" => return Protocol::Sixel,
            "blocks" | "halfblocks" | "half-blocks" => return Protocol::HalfBlocks,
            _ => {}
        }
    }
    let in_tmux = get("TMUX").is_some();
    let set = |name: &str| get(name).is_some();
    let (term, program) = if in_tmux {
        (String::new(), String::new())
    } else {
        (
            get("TERM").unwrap_or_default(),
            get("TERM_PROGRAM").unwrap_or_default(),
        )
    };

    if term == "xterm-kitty"
        || set("KITTY_WINDOW_ID")
        || term == "xterm-ghostty"
        || program.eq_ignore_ascii_case("ghostty")
        || set("GHOSTTY_RESOURCES_DIR")
    {
        return Protocol::Kitty;
    }
    if program == "iTerm.app"
        || get("LC_TERMINAL").as_deref() == Some("iTerm2")
        || set("ITERM_SESSION_ID")
        || program == "WezTerm"
        || set("WEZTERM_PANE")
        || set("WEZTERM_EXECUTABLE")
    {
        return Protocol::Iterm2;
    }
    if term.contains("sixel")
        || term == "foot"
        || term.starts_with("foot-")
        || term.starts_with("mlterm")
        || set("MLTERM")
    {
        return Protocol::Sixel;
    }
    Protocol::HalfBlocks
}

/// Writes the image (8-bit RGB, row-major, `width * height * 3` bytes) to `out`, scaled to
/// fit in `max_cols` x `max_rows` terminal cells keeping its aspect ratio, followed by a
/// newline.
///
/// Small images are enlarged (by a whole factor, nearest neighbour) to at least 32 cells
/// wide when that fits; large ones are shrunk. With half blocks one cell shows one pixel
/// across and two down; with a non-empty `NO_COLOR` they are shades without colour
/// escapes. Inside tmux the graphics escapes go through tmux's passthrough.
pub fn show(
    out: &mut impl Write,
    protocol: Protocol,
    width: u32,
    height: u32,
    rgb: &[u8],
    max_cols: u16,
    max_rows: u16,
) -> io::Result<()> {
    let image = Image::new(width, height, rgb)?;
    let term = Term {
        tmux: std::env::var_os("TMUX").is_some_and(|v| !v.is_empty()),
        cell_px: cell_pixels(),
    };
    let no_color = std::env::var("NO_COLOR").ok();
    show_with(
        out,
        protocol,
        &image,
        (max_cols, max_rows),
        no_color.as_deref(),
        term,
    )
}

/// Terminal size in cells (columns, rows) of stdout, else stderr; (80, 24) when neither is a
/// terminal.
pub fn terminal_cells() -> (u16, u16) {
    match window_size() {
        Some(ws) => (ws.ws_col, ws.ws_row),
        None => (80, 24),
    }
}

fn window_size() -> Option<libc::winsize> {
    [libc::STDOUT_FILENO, libc::STDERR_FILENO]
        .into_iter()
        .find_map(|fd| {
            // SAFETY: TIOCGWINSZ writes one `winsize` into the struct we pass, nothing else.
            let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
            let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
            (ok && ws.ws_col > 0 && ws.ws_row > 0).then_some(ws)
        })
}

/// The size of one cell in pixels, as the terminal reports it, else a common 10 x 20.
fn cell_pixels() -> (f64, f64) {
    match window_size() {
        Some(ws) if ws.ws_xpixel > 0 && ws.ws_ypixel > 0 => (
            f64::from(ws.ws_xpixel) / f64::from(ws.ws_col),
            f64::from(ws.ws_ypixel) / f64::from(ws.ws_row),
        ),
        _ => DEFAULT_CELL_PX,
    }
}

/// A borrowed RGB image.
#[derive(Clone, Copy)]
struct Image<'a> {
    width: u32,
    height: u32,
    rgb: &'a [u8],
}

impl<'a> Image<'a> {
    fn new(width: u32, height: u32, rgb: &'a [u8]) -> io::Result<Self> {
        let len = width as usize * height as usize * 3;
        if width == 0 || height == 0 || rgb.len() < len {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a {width}x{height} RGB image needs {len} bytes, got {}",
                    rgb.len()
                ),
            ));
        }
        Ok(Image {
            width,
            height,
            rgb: &rgb[..len],
        })
    }

    fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = (y as usize * self.width as usize + x as usize) * 3;
        [self.rgb[i], self.rgb[i + 1], self.rgb[i + 2]]
    }
}

/// What [`show`] needs to know about the terminal besides the protocol.
#[derive(Debug, Clone, Copy)]
struct Term {
    /// Running inside tmux: wrap graphics in passthrough.
    tmux: bool,
    /// Width and height of one cell in pixels.
    cell_px: (f64, f64),
}

/// [`show`] with the environment passed in: `no_color` is the value of `NO_COLOR`.
fn show_with(
    out: &mut impl Write,
    protocol: Protocol,
    image: &Image<'_>,
    (max_cols, max_rows): (u16, u16),
    no_color: Option<&str>,
    term: Term,
) -> io::Result<()> {
    let colourless = no_color.is_some_and(|value| !value.is_empty());
    let (max_cols, max_rows) = (max_cols.max(1), max_rows.max(1));
    let (w, h) = (f64::from(image.width), f64::from(image.height));
    if protocol == Protocol::HalfBlocks {
        let s = scale(w, h / 2.0, max_cols, max_rows);
        let cols = clamp_round(w * s, u32::from(max_cols));
        let px_rows = clamp_round(h * s, 2 * u32::from(max_rows));
        let pixels = resize(image, cols, px_rows);
        let bytes = match colourless {
            true => shades(&pixels),
            false => half_blocks(&pixels),
        };
        return out.write_all(&bytes);
    }

    let (cell_w, cell_h) = term.cell_px;
    let s = scale(w / cell_w, h / cell_h, max_cols, max_rows);
    let cols = clamp_round(w * s / cell_w, u32::from(max_cols));
    let rows = clamp_round(h * s / cell_h, u32::from(max_rows));
    let mut seq = Vec::new();
    match protocol {
        Protocol::Kitty => {
            let png = encode_png(image)?;
            for chunk in kitty_chunks(&png, cols, rows, term.tmux) {
                seq.extend_from_slice(&wrap_if(term.tmux, chunk.as_bytes()));
            }
        }
        Protocol::Iterm2 => {
            let mut resized = None;
            if term.tmux && image.width.max(image.height) > TMUX_ITERM2_MAX_PX {
                let k = f64::from(TMUX_ITERM2_MAX_PX) / w.max(h);
                let (rw, rh) = (clamp_round(w * k, u32::MAX), clamp_round(h * k, u32::MAX));
                resized = Some(resize(image, rw, rh));
            }
            let png = match &resized {
                Some(pixels) => encode_png(&pixels.view())?,
                None => encode_png(image)?,
            };
            seq = wrap_if(term.tmux, iterm2(&png, cols, rows).as_bytes());
        }
        Protocol::Sixel => {
            let px_w = clamp_round(w * s, u32::from(max_cols) * cell_w.ceil() as u32);
            let px_h = clamp_round(h * s, u32::from(max_rows) * cell_h.ceil() as u32);
            seq = wrap_if(term.tmux, &sixel(&resize(image, px_w, px_h).view()));
        }
        Protocol::HalfBlocks => unreachable!("handled above"),
    }

    let mut bytes = Vec::with_capacity(seq.len() + 2 * rows as usize + 8);
    if term.tmux {
        // tmux does not know the image is there: make room first (scrolling now, not after
        // the image is drawn), go back up, draw, then move tmux's cursor below the image.
        bytes.extend(std::iter::repeat_n(b'\n', rows as usize));
        write!(bytes, "\x1b[{rows}A")?;
        bytes.extend_from_slice(&seq);
        bytes.extend(std::iter::repeat_n(b'\n', rows as usize));
    } else {
        bytes.extend_from_slice(&seq);
        bytes.push(b'\n');
    }
    out.write_all(&bytes)
}

/// The factor to scale an image by whose natural size is `nat_cols` x `nat_rows` cells:
/// a whole factor up to reach [`MIN_COLS`] if that fits, otherwise the largest whole
/// factor that fits, or a fraction below 1 when even the natural size does not fit.
fn scale(nat_cols: f64, nat_rows: f64, max_cols: u16, max_rows: u16) -> f64 {
    let fit = (f64::from(max_cols) / nat_cols).min(f64::from(max_rows) / nat_rows);
    let up = if nat_cols < MIN_COLS {
        (MIN_COLS / nat_cols).ceil()
    } else {
        1.0
    };
    if up <= fit {
        up
    } else if fit >= 1.0 {
        fit.floor()
    } else {
        fit
    }
}

fn clamp_round(value: f64, max: u32) -> u32 {
    (value.round() as u32).clamp(1, max.max(1))
}

/// An owned RGB image.
struct Pixels {
    width: u32,
    height: u32,
    rgb: Vec<u8>,
}

impl Pixels {
    fn view(&self) -> Image<'_> {
        Image {
            width: self.width,
            height: self.height,
            rgb: &self.rgb,
        }
    }
}

/// Resizes to `width` x `height`: each output pixel is the mean of the input pixels it
/// covers, which is nearest neighbour when enlarging and a box filter when shrinking.
fn resize(image: &Image<'_>, width: u32, height: u32) -> Pixels {
    let span = |i: u32, out: u32, input: u32| {
        let start = (u64::from(i) * u64::from(input) / u64::from(out)) as u32;
        let end = (u64::from(i + 1) * u64::from(input) / u64::from(out)) as u32;
        start..end.max(start + 1).min(input)
    };
    let mut rgb = Vec::with_capacity(width as usize * height as usize * 3);
    for y in 0..height {
        let ys = span(y, height, image.height);
        for x in 0..width {
            let xs = span(x, width, image.width);
            let mut sum = [0u64; 3];
            for sy in ys.clone() {
                for sx in xs.clone() {
                    let p = image.pixel(sx, sy);
                    for c in 0..3 {
                        sum[c] += u64::from(p[c]);
                    }
                }
            }
            let n = u64::from(ys.len() as u32 * xs.len() as u32);
            rgb.extend(sum.map(|s| ((s + n / 2) / n) as u8));
        }
    }
    Pixels { width, height, rgb }
}

/// One line of `▀` per two pixel rows: the top pixel is the foreground colour, the bottom one
/// the background (the terminal's own background below an odd last row).
fn half_blocks(pixels: &Pixels) -> Vec<u8> {
    let image = pixels.view();
    let mut text = String::with_capacity(image.width as usize * image.height as usize * 20);
    for y in (0..image.height).step_by(2) {
        for x in 0..image.width {
            let [r, g, b] = image.pixel(x, y);
            let _ = write!(text, "\x1b[38;2;{r};{g};{b}m");
            if y + 1 < image.height {
                let [r, g, b] = image.pixel(x, y + 1);
                let _ = write!(text, "\x1b[48;2;{r};{g};{b}m▀");
            } else {
                text.push_str("\x1b[49m▀");
            }
        }
        text.push_str("\x1b[0m\n");
    }
    text.into_bytes()
}

/// One character per two pixel rows, by their mean luminance (BT.601): ` ░▒▓█` from dark
/// to light, with no escapes, for `NO_COLOR`.
fn shades(pixels: &Pixels) -> Vec<u8> {
    const SHADES: [char; 5] = [' ', '░', '▒', '▓', '█'];
    let image = pixels.view();
    let luma =
        |[r, g, b]: [u8; 3]| 0.299 * f64::from(r) + 0.587 * f64::from(g) + 0.114 * f64::from(b);
    let mut text = String::with_capacity(image.width as usize * image.height as usize * 2);
    for y in (0..image.height).step_by(2) {
        for x in 0..image.width {
            let below = (y + 1 < image.height).then(|| luma(image.pixel(x, y + 1)));
            let top = luma(image.pixel(x, y));
            let mean = below.map_or(top, |b| (top + b) / 2.0);
            let index = ((mean / 256.0) * SHADES.len() as f64) as usize;
            text.push(SHADES[index.min(SHADES.len() - 1)]);
        }
        text.push('\n');
    }
    text.into_bytes()
}

fn encode_png(image: &Image<'_>) -> io::Result<Vec<u8>> {
    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, image.width, image.height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(io::Error::other)?;
    writer
        .write_image_data(image.rgb)
        .map_err(io::Error::other)?;
    writer.finish().map_err(io::Error::other)?;
    Ok(png)
}

/// Kitty graphics escapes that transmit and display `png` over `cols` x `rows` cells, the
/// base64 payload split into chunks of at most 4096 bytes (`m=1` on all but the last).
/// Responses are suppressed (`q=2`); in tmux the cursor is left in place (`C=1`) because
/// tmux would not know it moved.
fn kitty_chunks(png: &[u8], cols: u32, rows: u32, tmux: bool) -> Vec<String> {
    let payload = BASE64.encode(png);
    let chunks: Vec<&[u8]> = payload.as_bytes().chunks(KITTY_CHUNK).collect();
    let last = chunks.len() - 1;
    let stay = if tmux { ",C=1" } else { "" };
    chunks
        .iter()
        .enumerate()
        .map(|(i, chunk)| {
            let more = u8::from(i < last);
            let data = std::str::from_utf8(chunk).expect("base64 is ASCII");
            if i == 0 {
                format!("\x1b_Ga=T,f=100,t=d,q=2{stay},c={cols},r={rows},m={more};{data}\x1b\\")
            } else {
                format!("\x1b_Gm={more},q=2;{data}\x1b\\")
            }
        })
        .collect()
}

/// The iTerm2 inline image escape showing `png` within `cols` x `rows` cells.
fn iterm2(png: &[u8], cols: u32, rows: u32) -> String {
    format!(
        "\x1b]1337;File=inline=1;size={};width={cols};height={rows};preserveAspectRatio=1:{}\x07",
        png.len(),
        BASE64.encode(png)
    )
}

fn wrap_if(tmux: bool, seq: &[u8]) -> Vec<u8> {
    if tmux {
        tmux_wrap(seq)
    } else {
        seq.to_vec()
    }
}

/// Wraps an escape sequence in tmux's passthrough DCS, doubling every ESC inside it.
fn tmux_wrap(seq: &[u8]) -> Vec<u8> {
    let mut wrapped = Vec::with_capacity(seq.len() + 16);
    wrapped.extend_from_slice(b"\x1bPtmux;");
    for &byte in seq {
        if byte == 0x1b {
            wrapped.push(0x1b);
        }
        wrapped.push(byte);
    }
    wrapped.extend_from_slice(b"\x1b\\");
    wrapped
}

/// Palette index of the nearest colour among a 6x6x6 cube (0..216) and 24 greys (216..240).
fn sixel_index([r, g, b]: [u8; 3]) -> u8 {
    let level = |c: u8| (u32::from(c) * 5 + 127) / 255;
    let (qr, qg, qb) = (level(r), level(g), level(b));
    let cube = [qr * 51, qg * 51, qb * 51];
    let mean = (u32::from(r) + u32::from(g) + u32::from(b)) / 3;
    let grey_step = ((mean.max(8) - 8 + 5) / 10).min(23);
    let grey = 8 + 10 * grey_step;
    let dist = |[pr, pg, pb]: [u32; 3]| {
        let d = |p: u32, c: u8| (p as i64 - i64::from(c)).pow(2);
        d(pr, r) + d(pg, g) + d(pb, b)
    };
    if dist([grey, grey, grey]) < dist(cube) {
        (216 + grey_step) as u8
    } else {
        (36 * qr + 6 * qg + qb) as u8
    }
}

/// The RGB colour of a [`sixel_index`] palette entry.
fn sixel_colour(index: u8) -> [u32; 3] {
    let i = u32::from(index);
    if i >= 216 {
        let grey = 8 + 10 * (i - 216);
        [grey; 3]
    } else {
        [i / 36 * 51, i / 6 % 6 * 51, i % 6 * 51]
    }
}

/// A sixel image (DCS q ... ST) of the pixels, quantised to [`sixel_index`]'s palette.
fn sixel(image: &Image<'_>) -> Vec<u8> {
    let (width, height) = (image.width as usize, image.height as usize);
    let indices: Vec<u8> = image
        .rgb
        .chunks_exact(3)
        .map(|p| sixel_index([p[0], p[1], p[2]]))
        .collect();
    let mut used = [false; 256];
    for &i in &indices {
        used[i as usize] = true;
    }

    let mut out = format!("\x1bP0;1q\"1;1;{width};{height}");
    for (i, _) in used.iter().enumerate().filter(|&(_, &u)| u) {
        let [r, g, b] = sixel_colour(i as u8).map(|c| (c * 100 + 127) / 255);
        let _ = write!(out, "#{i};2;{r};{g};{b}");
    }
    let mut masks: Vec<Vec<u8>> = vec![Vec::new(); 256];
    for top in (0..height).step_by(6) {
        let mut band_colours = Vec::new();
        for dy in 0..(height - top).min(6) {
            let row = &indices[(top + dy) * width..][..width];
            for (x, &c) in row.iter().enumerate() {
                let mask = &mut masks[c as usize];
                if mask.is_empty() {
                    mask.resize(width, 0);
                    band_colours.push(c);
                }
                mask[x] |= 1 << dy;
            }
        }
        band_colours.sort_unstable();
        for &c in &band_colours {
            let _ = write!(out, "#{c}");
            let mask = std::mem::take(&mut masks[c as usize]);
            let end = mask.iter().rposition(|&m| m != 0).map_or(0, |i| i + 1);
            let mut x = 0;
            while x < end {
                let run = mask[x..end].iter().take_while(|&&m| m == mask[x]).count();
                let ch = char::from(63 + mask[x]);
                if run > 3 {
                    let _ = write!(out, "!{run}{ch}");
                } else {
                    out.extend(std::iter::repeat_n(ch, run));
                }
                x += run;
            }
            out.push('$');
        }
        if top + 6 < height {
            out.push('-');
        }
    }
    out.push_str("\x1b\\");
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const TERM: Term = Term {
        tmux: false,
        cell_px: (10.0, 20.0),
    };

    fn render(protocol: Protocol, image: &Image<'_>, max: (u16, u16), term: Term) -> Vec<u8> {
        let mut out = Vec::new();
        show_with(&mut out, protocol, image, max, None, term).unwrap();
        out
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| map.get(name).cloned()
    }

    /// A noisy image that compresses badly, so that its PNG is large.
    fn noise(width: u32, height: u32) -> Vec<u8> {
        let mut state = 0x2545_f491_u32;
        (0..width * height * 3)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                state as u8
            })
            .collect()
    }

    #[test]
    fn half_blocks_of_a_2x4_image() {
        // Rows top to bottom: (1,2,3) (4,5,6) / (7,8,9) (10,11,12) / ... one colour per pixel.
        let rgb: Vec<u8> = (1..=24).collect();
        let image = Image::new(2, 4, &rgb).unwrap();
        let out = String::from_utf8(render(Protocol::HalfBlocks, &image, (2, 2), TERM)).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2, "{out:?}");
        for line in &lines {
            assert_eq!(line.matches('▀').count(), 2, "{line:?}");
        }
        assert_eq!(
            lines[0],
            "\x1b[38;2;1;2;3m\x1b[48;2;7;8;9m▀\x1b[38;2;4;5;6m\x1b[48;2;10;11;12m▀\x1b[0m"
        );
        assert_eq!(
            lines[1],
            "\x1b[38;2;13;14;15m\x1b[48;2;19;20;21m▀\x1b[38;2;16;17;18m\x1b[48;2;22;23;24m▀\x1b[0m"
        );
        assert!(out.ends_with('\n'));
    }

    #[test]
    fn half_blocks_odd_last_row_uses_the_default_background() {
        let rgb = [9u8; 2 * 3 * 3];
        let image = Image::new(2, 3, &rgb).unwrap();
        let out = String::from_utf8(render(Protocol::HalfBlocks, &image, (2, 2), TERM)).unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            "\x1b[38;2;9;9;9m\x1b[49m▀\x1b[38;2;9;9;9m\x1b[49m▀\x1b[0m"
        );
    }

    #[test]
    fn half_blocks_sizes() {
        let cells = |w: u32, h: u32, max: (u16, u16)| {
            let rgb = vec![128u8; (w * h * 3) as usize];
            let out = render(
                Protocol::HalfBlocks,
                &Image::new(w, h, &rgb).unwrap(),
                max,
                TERM,
            );
            let out = String::from_utf8(out).unwrap();
            let lines: Vec<&str> = out.lines().collect();
            (lines[0].matches('▀').count(), lines.len())
        };
        // Natural size fits: one pixel across, two down per cell.
        assert_eq!(cells(64, 64, (120, 37)), (64, 32));
        // Too big: shrunk keeping the aspect ratio.
        assert_eq!(cells(64, 64, (80, 24)), (48, 24));
        assert_eq!(cells(512, 256, (100, 50)), (100, 25));
        // Tiny: enlarged by a whole factor to at least 32 cells wide...
        assert_eq!(cells(8, 8, (120, 40)), (32, 16));
        // ...but never past the box.
        assert_eq!(cells(8, 8, (120, 10)), (16, 8));
    }

    #[test]
    fn no_color_keeps_an_asked_for_preview_but_drops_colour_escapes() {
        let rgb = noise(4, 4);
        let image = Image::new(4, 4, &rgb).unwrap();
        let draw = |protocol, no_color| {
            let mut out = Vec::new();
            show_with(&mut out, protocol, &image, (80, 24), no_color, TERM).unwrap();
            out
        };
        for protocol in [Protocol::Kitty, Protocol::Iterm2, Protocol::Sixel] {
            assert_eq!(
                draw(protocol, None),
                draw(protocol, Some("1")),
                "{protocol:?} draws the image as it is"
            );
        }
        let text = String::from_utf8(draw(Protocol::HalfBlocks, Some("1"))).unwrap();
        assert!(!text.contains('\x1b'), "{text:?}");
        assert!(text.chars().all(|c| " ░▒▓█\n".contains(c)), "{text:?}");
        // An empty NO_COLOR does not count.
        let out = draw(Protocol::HalfBlocks, Some(""));
        assert!(out.contains(&0x1b));
    }

    #[test]
    fn shades_go_from_dark_to_light() {
        let pixels = Pixels {
            width: 2,
            height: 2,
            rgb: vec![0, 0, 0, 255, 255, 255, 0, 0, 0, 255, 255, 255],
        };
        assert_eq!(String::from_utf8(shades(&pixels)).unwrap(), " █\n");
    }

    #[test]
    fn wrong_buffer_size_is_an_error() {
        let mut out = Vec::new();
        let err = show(&mut out, Protocol::HalfBlocks, 2, 2, &[0; 11], 80, 24).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(out.is_empty());
    }

    #[test]
    fn tmux_wrap_doubles_esc() {
        assert_eq!(
            tmux_wrap(b"\x1b_Gm=0;QUJD\x1b\\"),
            b"\x1bPtmux;\x1b\x1b_Gm=0;QUJD\x1b\x1b\\\x1b\\".to_vec()
        );
    }

    fn split_kitty(out: &str) -> Vec<(&str, &str)> {
        out.split("\x1b_G")
            .skip(1)
            .map(|part| {
                let body = part.split("\x1b\\").next().unwrap();
                body.split_once(';').unwrap()
            })
            .collect()
    }

    #[test]
    fn kitty_chunks_are_at_most_4096_bytes() {
        let rgb = noise(64, 64);
        let image = Image::new(64, 64, &rgb).unwrap();
        let out = String::from_utf8(render(Protocol::Kitty, &image, (120, 40), TERM)).unwrap();
        let chunks = split_kitty(&out);
        assert!(chunks.len() > 2, "{}", chunks.len());
        let last = chunks.len() - 1;
        let mut payload = String::new();
        for (i, (keys, data)) in chunks.iter().enumerate() {
            assert!(data.len() <= KITTY_CHUNK);
            let more = if i < last { "m=1" } else { "m=0" };
            assert!(keys.split(',').any(|k| k == more), "chunk {i}: {keys}");
            payload.push_str(data);
        }
        // 64 px at 10 px a cell is enlarged 5x to 32 cells; 64 px at 20 px a cell: 16 rows.
        assert_eq!(chunks[0].0, "a=T,f=100,t=d,q=2,c=32,r=16,m=1");
        let png = BASE64.decode(payload).unwrap();
        assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(out.ends_with("\x1b\\\n"));
    }

    #[test]
    fn kitty_in_tmux_wraps_every_chunk_and_keeps_the_cursor() {
        let rgb = noise(64, 64);
        let image = Image::new(64, 64, &rgb).unwrap();
        let tmux = Term { tmux: true, ..TERM };
        let out = String::from_utf8(render(Protocol::Kitty, &image, (120, 40), tmux)).unwrap();
        let starts = out.matches("\x1bPtmux;\x1b\x1b_G").count();
        assert!(starts > 2);
        assert_eq!(starts, out.matches("\x1b\x1b\\\x1b\\").count());
        assert!(out.contains(",C=1,"));
        assert!(out.starts_with(&format!("{}\x1b[16A\x1bPtmux;", "\n".repeat(16))));
        assert!(out.ends_with(&format!("\x1b\\{}", "\n".repeat(16))));
    }

    #[test]
    fn iterm2_escape() {
        let rgb = noise(64, 32);
        let image = Image::new(64, 32, &rgb).unwrap();
        let out = String::from_utf8(render(Protocol::Iterm2, &image, (120, 40), TERM)).unwrap();
        let (head, rest) = out.split_once(':').unwrap();
        let png = BASE64.decode(rest.strip_suffix("\x07\n").unwrap()).unwrap();
        assert_eq!(
            head,
            format!(
                "\x1b]1337;File=inline=1;size={};width=32;height=8;preserveAspectRatio=1",
                png.len()
            )
        );
        assert!(png.starts_with(b"\x89PNG"));
    }

    /// Decodes the colour indices of a sixel image written by [`sixel`].
    fn decode_sixel(seq: &str) -> (usize, usize, Vec<Option<u8>>) {
        let body = seq.strip_prefix("\x1bP0;1q\"1;1;").unwrap();
        let body = body.strip_suffix("\x1b\\").unwrap();
        let (w, rest) = body.split_once(';').unwrap();
        let end = rest.find('#').unwrap();
        let (w, h): (usize, usize) = (w.parse().unwrap(), rest[..end].parse().unwrap());
        let mut pixels = vec![None; w * h];
        let (mut x, mut top, mut colour) = (0, 0, 0u8);
        let mut chars = rest[end..].chars().peekable();
        let number = |chars: &mut std::iter::Peekable<std::str::Chars>| {
            let mut n = 0usize;
            while let Some(d) = chars.peek().and_then(|c| c.to_digit(10)) {
                n = n * 10 + d as usize;
                chars.next();
            }
            n
        };
        while let Some(c) = chars.next() {
            match c {
                '#' => {
                    colour = number(&mut chars) as u8;
                    if chars.peek() == Some(&';') {
                        // A palette definition: skip ";2;r;g;b".
                        for _ in 0..4 {
                            chars.next();
                            number(&mut chars);
                        }
                    }
                }
                '$' => x = 0,
                '-' => (x, top) = (0, top + 6),
                '!' | '?'..='~' => {
                    let (run, ch) = if c == '!' {
                        (number(&mut chars), chars.next().unwrap())
                    } else {
                        (1, c)
                    };
                    let bits = ch as u8 - 63;
                    for _ in 0..run {
                        for dy in 0..6 {
                            if bits & (1 << dy) != 0 {
                                assert!(pixels[(top + dy) * w + x].is_none(), "painted twice");
                                pixels[(top + dy) * w + x] = Some(colour);
                            }
                        }
                        x += 1;
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        (w, h, pixels)
    }

    #[test]
    fn sixel_round_trips() {
        let (w, h) = (13, 17);
        let mut rgb = noise(w, h);
        // Some flat runs, for the run-length encoding.
        rgb[..13 * 3 * 4].fill(200);
        let image = Image::new(w, h, &rgb).unwrap();
        let seq = String::from_utf8(sixel(&image)).unwrap();
        assert!(seq.contains('!'));
        let (dw, dh, pixels) = decode_sixel(&seq);
        assert_eq!((dw, dh), (13, 17));
        let expected: Vec<Option<u8>> = rgb
            .chunks_exact(3)
            .map(|p| Some(sixel_index([p[0], p[1], p[2]])))
            .collect();
        assert_eq!(pixels, expected);
    }

    #[test]
    fn sixel_palette() {
        assert_eq!(sixel_index([0, 0, 0]), 0);
        assert_eq!(sixel_index([6, 6, 6]), 216); // grey 8 is nearer than black
        assert_eq!(sixel_index([255, 0, 0]), 180);
        assert_eq!(sixel_index([255, 255, 255]), 215);
        assert_eq!(sixel_index([128, 128, 128]), 216 + 12);
        for i in 0..240u8 {
            let [r, g, b] = sixel_colour(i).map(|c| c as u8);
            assert_eq!(sixel_index([r, g, b]), i, "{i}");
        }
    }

    #[test]
    fn sixel_is_sized_in_pixels() {
        let rgb = noise(64, 64);
        let image = Image::new(64, 64, &rgb).unwrap();
        let out = String::from_utf8(render(Protocol::Sixel, &image, (120, 40), TERM)).unwrap();
        // Enlarged 5x, like the kitty image: 320 px = 32 cells of 10 px.
        assert!(out.starts_with("\x1bP0;1q\"1;1;320;320#"));
        assert!(out.ends_with("\x1b\\\n"));
    }

    #[test]
    fn detection() {
        use Protocol::*;
        let cases: &[(&[(&str, &str)], Protocol)] = &[
            (&[], HalfBlocks),
            (&[("TERM", "xterm-256color")], HalfBlocks),
            (&[("TERM", "xterm-kitty")], Kitty),
            (
                &[("TERM", "xterm-256color"), ("KITTY_WINDOW_ID", "3")],
                Kitty,
            ),
            (&[("TERM", "xterm-ghostty")], Kitty),
            (&[("TERM_PROGRAM", "iTerm.app")], Iterm2),
            (&[("TERM_PROGRAM", "WezTerm")], Iterm2),
            (&[("TERM", "foot")], Sixel),
            (&[("TERM", "mlterm")], Sixel),
            (&[("TERM", "xterm-sixel")], Sixel),
            (
                &[("TERM", "xterm-256color"), ("DWCTL_PREVIEW", "sixel")],
                Sixel,
            ),
            (
                &[("TERM", "xterm-kitty"), ("DWCTL_PREVIEW", "blocks")],
                HalfBlocks,
            ),
            (&[("DWCTL_PREVIEW", "Kitty")], Kitty),
            (&[("DWCTL_PREVIEW", "iterm2")], Iterm2),
            (
                &[("TERM", "xterm-kitty"), ("DWCTL_PREVIEW", "bogus")],
                Kitty,
            ),
            (&[("TERM", "xterm-kitty"), ("KITTY_WINDOW_ID", "")], Kitty),
            (&[("TERM", "xterm"), ("KITTY_WINDOW_ID", "")], HalfBlocks),
            // tmux: TERM and TERM_PROGRAM describe tmux, not the terminal.
            (
                &[
                    ("TMUX", "/tmp/tmux-1/default,1,0"),
                    ("TERM", "tmux-256color"),
                ],
                HalfBlocks,
            ),
            (
                &[
                    ("TMUX", "/tmp/t,1,0"),
                    ("TERM", "xterm-kitty"),
                    ("TERM_PROGRAM", "tmux"),
                ],
                HalfBlocks,
            ),
            (&[("TMUX", "/tmp/t,1,0"), ("TERM", "foot")], HalfBlocks),
            (&[("TMUX", "/tmp/t,1,0"), ("KITTY_WINDOW_ID", "1")], Kitty),
            (&[("TMUX", "/tmp/t,1,0"), ("LC_TERMINAL", "iTerm2")], Iterm2),
            (&[("TMUX", "/tmp/t,1,0"), ("WEZTERM_PANE", "0")], Iterm2),
            (&[("TMUX", "/tmp/t,1,0"), ("DWCTL_PREVIEW", "kitty")], Kitty),
        ];
        for (vars, expected) in cases {
            assert_eq!(detect_from(env(vars)), *expected, "{vars:?}");
        }
    }

    #[test]
    fn resize_is_nearest_up_and_mean_down() {
        let rgb = [0, 0, 0, 100, 100, 100];
        let image = Image::new(2, 1, &rgb).unwrap();
        assert_eq!(
            resize(&image, 4, 2).rgb,
            [0, 0, 0, 0, 0, 0, 100, 100, 100, 100, 100, 100].repeat(2)
        );
        assert_eq!(resize(&image, 1, 1).rgb, [50, 50, 50]);
    }
}
