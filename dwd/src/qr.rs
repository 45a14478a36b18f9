//! QR codes as the Python `qrcode` package draws them (what diffusers-workflow's `qr_code`
//! task uses): the smallest version that holds the data at the asked error correction, and
//! the mask pattern with the fewest penalty points by that package's own scoring — which
//! scores each mask with the format information left blank and skips some positions in
//! two of its rules, so it can choose another mask than the standard's scoring would.
//! The `qrcode` crate encodes the data and draws the symbol.

use qrcode::canvas::{Canvas, MaskPattern};
use qrcode::{bits, ec, Color, EcLevel};

const PATTERNS: [MaskPattern; 8] = [
    MaskPattern::Checkerboard,
    MaskPattern::HorizontalLines,
    MaskPattern::VerticalLines,
    MaskPattern::DiagonalLines,
    MaskPattern::LargeCheckerboard,
    MaskPattern::Fields,
    MaskPattern::Diamonds,
    MaskPattern::Meadow,
];

/// The symbol's modules, row by row (`true`: dark), without the quiet zone.
pub fn modules(data: &[u8], ec_level: EcLevel) -> Result<Vec<Vec<bool>>, qrcode::types::QrError> {
    let bits = bits::encode_auto(data, ec_level)?;
    let version = bits.version();
    let (data, ec_data) = ec::construct_codewords(&bits.into_bytes(), version, ec_level)?;
    let mut canvas = Canvas::new(version, ec_level);
    canvas.draw_all_functional_patterns();
    canvas.draw_data(&data, &ec_data);
    let masked = |pattern: MaskPattern| {
        let mut masked = canvas.clone();
        masked.apply_mask(pattern);
        grid(masked.into_colors())
    };
    let mut best = (PATTERNS[0], u64::MAX);
    for pattern in PATTERNS {
        let mut scored = masked(pattern);
        blank_format_information(&mut scored);
        let points = lost_points(&scored);
        if points < best.1 {
            best = (pattern, points);
        }
    }
    Ok(masked(best.0))
}

fn grid(colors: Vec<Color>) -> Vec<Vec<bool>> {
    let side = (colors.len() as f64).sqrt() as usize;
    colors
        .chunks(side)
        .map(|row| row.iter().map(|&c| c == Color::Dark).collect())
        .collect()
}

/// The package scores masks with the format (and version) information and the fixed dark
/// module all light.
fn blank_format_information(modules: &mut [Vec<bool>]) {
    let n = modules.len();
    for i in 0..15 {
        let row = match i {
            0..=5 => i,
            6 | 7 => i + 1,
            _ => n - 15 + i,
        };
        modules[row][8] = false;
        let col = match i {
            0..=7 => n - i - 1,
            8 => 7,
            _ => 15 - i - 1,
        };
        modules[8][col] = false;
    }
    modules[n - 8][8] = false;
    if n >= 45 {
        for i in 0..18 {
            modules[i / 3][i % 3 + n - 11] = false;
            modules[i % 3 + n - 11][i / 3] = false;
        }
    }
}

/// The package's `lost_point`: runs of five or more, 2x2 blocks, finder-like patterns and
/// the dark share, each as it computes them.
fn lost_points(m: &[Vec<bool>]) -> u64 {
    let n = m.len();
    let column = |c: usize| -> Vec<bool> { m.iter().map(|row| row[c]).collect() };
    let lines: Vec<Vec<bool>> = m.iter().cloned().chain((0..n).map(column)).collect();
    let runs: u64 = lines.iter().map(|line| run_points(line)).sum();
    let finder: u64 = lines.iter().map(|line| finder_points(line)).sum();
    runs + block_points(m) + finder + balance_points(m)
}

fn run_points(line: &[bool]) -> u64 {
    let mut points = 0;
    let mut length = 0;
    let mut previous = line[0];
    for &module in line {
        if module == previous {
            length += 1;
        } else {
            if length >= 5 {
                points += length - 2;
            }
            length = 1;
            previous = module;
        }
    }
    if length >= 5 {
        points += length - 2;
    }
    points
}

/// 2x2 blocks of one colour, 3 points each; where the right column of a pair of rows
/// differs, the package skips the next position.
fn block_points(m: &[Vec<bool>]) -> u64 {
    let n = m.len();
    let mut points = 0;
    for row in 0..n - 1 {
        let (this, next) = (&m[row], &m[row + 1]);
        let mut col = 0;
        while col < n - 1 {
            let top_right = this[col + 1];
            if top_right != next[col + 1] {
                col += 2;
                continue;
            }
            if top_right == this[col] && top_right == next[col] {
                points += 3;
            }
            col += 1;
        }
    }
    points
}

/// 1:1:3:1:1 patterns with four light modules on one side, 40 points each; after a dark
/// eleventh module the package skips the next position.
fn finder_points(line: &[bool]) -> u64 {
    let n = line.len();
    if n < 11 {
        return 0;
    }
    let mut points = 0;
    let mut i = 0;
    while i < n - 10 {
        let l = &line[i..i + 11];
        let core = !l[1] && l[4] && !l[5] && l[6] && !l[9];
        let before = l[0] && l[2] && l[3] && !l[7] && !l[8] && !l[10];
        let after = !l[0] && !l[2] && !l[3] && l[7] && l[8] && l[10];
        if core && (before || after) {
            points += 40;
        }
        i += if l[10] { 2 } else { 1 };
    }
    points
}

fn balance_points(m: &[Vec<bool>]) -> u64 {
    let n = m.len();
    let dark = m.iter().flatten().filter(|&&d| d).count();
    let percent = dark as f64 / (n * n) as f64;
    ((percent * 100.0 - 50.0).abs() / 5.0) as u64 * 10
}
