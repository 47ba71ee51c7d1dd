//! Prefix list files named by `files = [...]`: one address or prefix per line, in any notation
//! [`crate::prefix`] accepts; `#` and `;` start comments, so Spamhaus DROP lists
//! (`1.10.16.0/20 ; SBL256894`) load as they are. The file is read whole; what each line says
//! is checked when the policy is built, so a refusal names the file and line.

use std::{path::Path, sync::Arc};

use crate::source::config::{ConfigError, Location};

/// Files larger than this are refused rather than read: a list of a few million prefixes is
/// well under it, a wrong path (a disk image, a log) is not.
pub const MAX_FILE_BYTES: u64 = 256 << 20;

/// The prefixes `path` lists, as written, each with its line.
pub fn read(path: &Path) -> Result<Vec<(String, Location)>, ConfigError> {
    Ok(entries(
        path,
        &crate::source::config::read_text(path, MAX_FILE_BYTES)?,
    ))
}

/// The non-empty, comment-stripped lines of `text`.
pub fn entries(path: &Path, text: &str) -> Vec<(String, Location)> {
    let file: Arc<Path> = path.into();
    text.lines()
        .enumerate()
        .filter_map(|(index, line)| {
            let content = line.split(['#', ';']).next().unwrap_or("").trim();
            (!content.is_empty()).then(|| {
                (
                    content.to_owned(),
                    Location {
                        file: Arc::clone(&file),
                        line: index + 1,
                    },
                )
            })
        })
        .collect()
}

/// A list file that [`entries`] reads back as `entries`, each at its own line: the comments
/// and blank lines of the original are left empty, so line numbers stay those of the original.
pub fn render(entries: &[(String, Location)]) -> String {
    let mut text = String::with_capacity(entries.iter().map(|(line, _)| line.len() + 1).sum());
    let mut line = 1;
    for (content, at) in entries {
        while line < at.line {
            text.push('\n');
            line += 1;
        }
        text.push_str(content);
        text.push('\n');
        line += 1;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spamhaus_drop_format_and_comments() {
        let text = "; Spamhaus DROP List 2026/11/23\n; Expires: ...\n1.10.16.0/20 ; SBL256894\n\n  # a note\n2.56.192.0/22 ; SBL459831\n208.123.79.0 255.255.255.0   # provider page notation\n192.0.2.7\n";
        let lines = entries(Path::new("/etc/smtpguard/drop.txt"), text);
        let got: Vec<(&str, usize)> = lines
            .iter()
            .map(|(text, at)| (text.as_str(), at.line))
            .collect();
        assert_eq!(
            got,
            [
                ("1.10.16.0/20", 3),
                ("2.56.192.0/22", 6),
                ("208.123.79.0 255.255.255.0", 7),
                ("192.0.2.7", 8)
            ]
        );
        assert_eq!(lines[0].1.to_string(), "/etc/smtpguard/drop.txt:3");
        let copy = render(&lines);
        assert_eq!(
            copy,
            "\n\n1.10.16.0/20\n\n\n2.56.192.0/22\n208.123.79.0 255.255.255.0\n192.0.2.7\n"
        );
        assert_eq!(entries(Path::new("/etc/smtpguard/drop.txt"), &copy), lines);
        assert_eq!(render(&[]), "");
    }
}
