//! A corpus of bad configurations, each of which must be refused with the file and line of
//! the offending value (or, for files that cannot be read at all, a clear reason). Shared by
//! the parsing test and the SIGHUP test, which offers every case to a running daemon.

use std::path::Path;

/// `(configuration text, what the refusal must say after the file name)`. `head` is the
/// first line, naming the interfaces; `{file}` in an expectation stands for the file's path.
pub fn text_cases(head: &str) -> Vec<(String, String)> {
    let allow =
        |prefix: &str| format!("{head}[[allow]]\nname = \"p\"\nprefixes = [\"{prefix}\"]\n");
    let cases: Vec<(String, &str)> = vec![
        ("interfaces = [\"eth0\"\n".into(), ":1: "),
        ("interfaces = \"eth0\"\n".into(), ":1: invalid type"),
        ("interfaces = [1]\n".into(), ":1: invalid type"),
        (format!("{head}ports = 25\n"), ":2: invalid type"),
        (format!("{head}ports = [25.0]\n"), ":2: invalid type"),
        (format!("{head}ports = [-1]\n"), ":2: bad port -1"),
        (format!("{head}ports = [65536]\n"), ":2: bad port 65536"),
        (format!("{head}xdp_mode = 1\n"), ":2: "),
        (
            format!("{head}xdp_mode = \"NATIVE\"\n"),
            ":2: unknown variant",
        ),
        (format!("{head}allow_none = \"yes\"\n"), ":2: invalid type"),
        (
            format!("{head}enforce = true\n"),
            ":2: unknown field `enforce`",
        ),
        (
            format!("{head}mode = \"block\"\n"),
            ":2: unknown variant `block`",
        ),
        (
            format!("{head}action = \"tarpit\"\n"),
            ":2: unknown variant `tarpit`",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\naction = \"reject\"\n"),
            ":4: bad action \"reject\": only [[deny]] rules have an action",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nhosts = [\"mx .example\"]\n"),
            ":4: bad host name \"mx .example\"",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nhosts = [\"192.0.2.1\"]\n"),
            ":4: bad host name \"192.0.2.1\": an address, not a name",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nfiles = [\"provider.txt\"]\n"),
            ":4: bad files \"provider.txt\": not an absolute path",
        ),
        (
            format!("{head}[dns]\nresolver = \"localhost:53\"\n"),
            ":3: bad resolver \"localhost:53\"",
        ),
        (
            format!("{head}[dns]\nmin_refresh_secs = 0\n"),
            ":3: bad min_refresh_secs \"0\"",
        ),
        (
            format!("{head}[dns]\nmin_refresh_secs = 600\nmax_refresh_secs = 60\n"),
            ":4: bad max_refresh_secs \"60\": smaller than min_refresh_secs",
        ),
        (format!("{head}[allow]\nname = \"p\"\n"), ":2: invalid type"),
        (
            format!("{head}[[allow]]\nprefixes = [\"192.0.2.1\"]\n"),
            ":2: missing field `name`",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nprefixes = \"192.0.2.1\"\n"),
            ":4: invalid type",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nprefixes = [192]\n"),
            ":4: invalid type",
        ),
        (
            format!("{head}[[allow]]\nname = \"p\"\nhost = [\"mx.example\"]\n"),
            ":4: unknown field `host`",
        ),
        (allow("192.0.2.256"), ":4: bad prefix \"192.0.2.256\""),
        (
            allow("192.0.2.0/33"),
            ":4: bad prefix \"192.0.2.0/33\": prefix length must be 0 to 32",
        ),
        (
            allow("192.0.2.0/255.0.255.0"),
            ":4: bad prefix \"192.0.2.0/255.0.255.0\": netmask 255.0.255.0 is not contiguous",
        ),
        (allow("2001:db8::/129"), ":4: bad prefix \"2001:db8::/129\""),
        (
            allow("2001:db8::/ffff::"),
            ":4: bad prefix \"2001:db8::/ffff::\"",
        ),
        (
            allow("mail.example.com"),
            ":4: bad prefix \"mail.example.com\": not an IPv4 or IPv6 address",
        ),
        (allow("192.0.2.0 /24 x"), ":4: bad prefix"),
        (allow(""), ":4: bad prefix \"\""),
        (allow("192.0.2.1-192.0.2.9"), ":4: bad prefix"),
        (allow("::ffff:192.0.2.1/200"), ":4: bad prefix"),
        (
            format!(
                "{head}[[allow]]\nname = \"p\"\nprefixes = [\"192.0.2.0/24\"]\n[[deny]]\nname = \"d\"\nprefixes = [\n  \"198.51.100.1\",\n  \"192.0.2.0/255.255.255.0\",\n]\n"
            ),
            ":9: prefix 192.0.2.0/24 is in both lists",
        ),
        (
            format!(
                "{head}[[deny]]\nname = \"d\"\nprefixes = [\"2001:db8::1\"]\n[[allow]]\nname = \"p\"\nprefixes = [\"2001:db8::1/128\"]\n"
            ),
            ":4: prefix 2001:db8::1/128 is in both lists: allow rule \"p\" ({file}:7)",
        ),
        ("interfaces = []\n".into(), ":1: `interfaces` is empty"),
        (
            "interfaces = [\"\"]\n".into(),
            ":1: bad interface name \"\"",
        ),
        (format!("{head}ports = []\n"), ":2: `ports` is empty"),
        (
            format!("{head}[[allow]]\nname = \"\"\nprefixes = [\"192.0.2.1\"]\n"),
            ":3: bad rule name",
        ),
        (format!("{head}interfaces = [\"eth1\"]\n"), ":2: "),
        (head.to_owned(), ": no allow prefix at all"),
    ];
    cases
        .into_iter()
        .map(|(text, expected)| (text, expected.to_owned()))
        .collect()
}

/// Cases that need files beside the configuration, written into `dir`: `(configuration
/// bytes, expectation)`, the expectation starting with the path it names.
pub fn file_cases(head: &str, dir: &Path) -> Vec<(Vec<u8>, String)> {
    let list = |name: &str| dir.join(name).display().to_string();
    let config = |file: &str| {
        format!(
            "{head}[[allow]]\nname = \"p\"\nfiles = [\"{}\"]\n",
            list(file)
        )
        .into_bytes()
    };
    std::fs::write(dir.join("latin1.txt"), b"192.0.2.0/24 # caf\xe9\n").expect("write list");
    std::fs::write(
        dir.join("bad-line.txt"),
        "; provider\n192.0.2.0/24\n\n192.0.2.300\n",
    )
    .expect("write list");
    std::fs::create_dir_all(dir.join("a-directory.txt")).expect("dir");
    // A FIFO nobody writes to: reading it the plain way blocks the daemon for good.
    let fifo = dir.join("a-fifo.txt");
    if !fifo.exists() {
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).expect("path");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        let rc = unsafe { libc::mkfifo(path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    }
    let huge = std::fs::File::create(dir.join("huge.txt")).expect("huge list");
    // Sparse: the size is real, the disk blocks are not.
    huge.set_len(300 << 20).expect("size the huge list");
    vec![
        (
            // A configuration is no place for a prefix list: 17 MiB of it is refused unread.
            vec![b'#'; 17 << 20],
            "{file}: 17825792 bytes, more than the 16777216 such a file may have".to_owned(),
        ),
        (
            [head.as_bytes(), b"[[allow]]\nname = \"caf\xe9\"\n"].concat(),
            "{file}: not UTF-8 text".to_owned(),
        ),
        (
            config("missing.txt"),
            format!("{}: cannot read", list("missing.txt")),
        ),
        (
            config("a-directory.txt"),
            format!(
                "{}: a directory, not a regular file",
                list("a-directory.txt")
            ),
        ),
        (
            config("a-fifo.txt"),
            format!("{}: a FIFO, not a regular file", list("a-fifo.txt")),
        ),
        (
            // Endless: refused for what it is, before a byte is read.
            format!("{head}[[allow]]\nname = \"p\"\nfiles = [\"/dev/zero\"]\n").into_bytes(),
            "/dev/zero: a character device, not a regular file".to_owned(),
        ),
        (
            config("latin1.txt"),
            format!("{}: not UTF-8 text", list("latin1.txt")),
        ),
        (
            config("bad-line.txt"),
            format!("{}:4: bad prefix \"192.0.2.300\"", list("bad-line.txt")),
        ),
        (
            config("huge.txt"),
            format!(
                "{}: 314572800 bytes, more than the 268435456 such a file may have",
                list("huge.txt")
            ),
        ),
    ]
}

/// Every case for a configuration at `file`: the text cases and the file cases (their files
/// written into `dir`), each expectation starting with the path it names.
pub fn all_cases(head: &str, dir: &Path, file: &str) -> Vec<(Vec<u8>, String)> {
    let mut cases: Vec<(Vec<u8>, String)> = text_cases(head)
        .into_iter()
        .map(|(text, expected)| {
            (
                text.into_bytes(),
                format!("{file}{}", expected.replace("{file}", file)),
            )
        })
        .collect();
    cases.extend(
        file_cases(head, dir)
            .into_iter()
            .map(|(bytes, expected)| (bytes, expected.replace("{file}", file))),
    );
    cases
}
