//! MQTT topic names and filters (MQTT 3.1.1 §4.7, unchanged in MQTT 5), shared by validation and
//! the data path.
//!
//! Besides matching, two relations between *filters* let validation reason about rules before any
//! message exists:
//! - [`covers`]`(a, b)`: every topic `b` matches, `a` matches too (so subscribing to both is redundant),
//! - [`intersects`]`(a, b)`: some topic matches both (so a message could be delivered twice, or a
//!   command could loop back upstream).
//!
//! Both walk the two filters level by level; they are exact (the tests check them against brute
//! force over every short topic).

/// Longest topic or filter MQTT can encode (a two-byte length prefix).
pub const MAX_LEN: usize = 65_535;

/// Checks a subscription filter: non-empty, at most [`MAX_LEN`] bytes, no NUL, `+` alone in its level,
/// `#` alone in the last level.
pub fn valid_filter(filter: &str) -> Result<(), String> {
    check_common(filter, "filter")?;
    let levels: Vec<&str> = filter.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') {
            if *level != "#" {
                return Err(format!(
                    "`#` must be a whole level on its own in filter `{filter}` (e.g. `sensors/#`)"
                ));
            }
            if i != last {
                return Err(format!(
                    "`#` must be the last level of filter `{filter}` (it matches everything below)"
                ));
            }
        }
        if level.contains('+') && *level != "+" {
            return Err(format!(
                "`+` must be a whole level on its own in filter `{filter}` (e.g. `sensors/+/temp`)"
            ));
        }
    }
    Ok(())
}

/// Checks a topic name as published: like a filter, but without wildcards.
pub fn valid_topic(topic: &str) -> Result<(), String> {
    check_common(topic, "topic")?;
    if topic.contains(['+', '#']) {
        return Err(format!(
            "topic `{topic}` contains a wildcard (`+` or `#`); only subscription filters may"
        ));
    }
    Ok(())
}

fn check_common(s: &str, what: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err(format!("an MQTT {what} cannot be empty"));
    }
    if s.len() > MAX_LEN {
        return Err(format!(
            "{what} is {} bytes long; MQTT allows at most {MAX_LEN}",
            s.len()
        ));
    }
    if s.contains('\0') {
        return Err(format!(
            "{what} `{}` contains a NUL character",
            s.escape_debug()
        ));
    }
    Ok(())
}

/// Whether `topic` matches `filter`, with MQTT semantics: `+` is one level, `#` is the rest
/// including the parent level (`sensors/#` matches `sensors`), and a topic starting with `$` is not
/// matched by a filter starting with a wildcard.
///
/// Inputs are assumed valid (see [`valid_filter`], [`valid_topic`]); invalid ones do not panic.
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    // A filter has at most as many levels as its length, so this loop ends.
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether every topic matched by `b` is also matched by `a` (`a` is at least as broad as `b`).
pub fn covers(a: &str, b: &str) -> bool {
    covers_levels(&levels(a), &levels(b), true)
}

/// The filter's levels, with `#` alone spelled `+/#` and `/#` spelled `/+/#`: they match the same
/// topics. The level-wise comparisons let a final `#` also match zero levels (the parent topic),
/// which for these two filters would be the empty topic, and no topic is empty.
fn levels(filter: &str) -> Vec<&str> {
    match filter {
        "#" => vec!["+", "#"],
        "/#" => vec!["", "+", "#"],
        _ => filter.split('/').collect(),
    }
}

fn covers_levels(a: &[&str], b: &[&str], root: bool) -> bool {
    // Wildcards in the first level do not match `$` topics, so `a` cannot cover a `b` that names one.
    let b_names_dollar = root && b.first().is_some_and(|l| l.starts_with('$'));
    match (a.first(), b.first()) {
        (Some(&"#"), _) => !b_names_dollar,
        (None, None) => true,
        // `b` ends here (or matches "zero more levels" with `#`) but `a` needs more, or `b`
        // continues where `a` has ended.
        (None, Some(_)) | (Some(_), None) => false,
        // `b` matches arbitrarily deep topics (and its parent); only `#` in `a` can follow.
        (Some(_), Some(&"#")) => false,
        (Some(&"+"), Some(_)) => !b_names_dollar && covers_levels(&a[1..], &b[1..], false),
        (Some(al), Some(bl)) => al == bl && covers_levels(&a[1..], &b[1..], false),
    }
}

/// Whether some topic is matched by both `a` and `b`.
pub fn intersects(a: &str, b: &str) -> bool {
    intersects_levels(&levels(a), &levels(b), true)
}

fn intersects_levels(a: &[&str], b: &[&str], root: bool) -> bool {
    let dollar = |l: Option<&&str>| root && l.is_some_and(|l| l.starts_with('$'));
    match (a.first(), b.first()) {
        (Some(&"#"), _) => !dollar(b.first()),
        (_, Some(&"#")) => !dollar(a.first()),
        (None, None) => true,
        (None, Some(_)) | (Some(_), None) => false,
        (Some(&"+"), Some(&"+")) => intersects_levels(&a[1..], &b[1..], false),
        (Some(&"+"), Some(_)) => !dollar(b.first()) && intersects_levels(&a[1..], &b[1..], false),
        (Some(_), Some(&"+")) => !dollar(a.first()) && intersects_levels(&a[1..], &b[1..], false),
        (Some(al), Some(bl)) => al == bl && intersects_levels(&a[1..], &b[1..], false),
    }
}

/// The filter's levels before its first wildcard, with the trailing `/`: `edgegate/gw1/cmd/` for
/// `edgegate/gw1/cmd/#`. A filter without wildcards is returned whole (no trailing `/`).
pub fn fixed_prefix(filter: &str) -> &str {
    let mut offset = 0;
    for level in filter.split('/') {
        if level == "+" || level == "#" {
            return &filter[..offset];
        }
        offset += level.len() + 1;
    }
    filter
}

/// Expands `{name}` placeholders in a topic template in one pass: a value that itself contains
/// `{…}` is not expanded again. Placeholders without a value are left as written.
pub fn expand(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    // Each iteration consumes at least one byte of `rest`.
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let value = after.find('}').and_then(|close| {
            vars.iter()
                .find(|(k, _)| *k == &after[..close])
                .map(|(_, v)| (close, v))
        });
        match value {
            Some((close, v)) => {
                out.push_str(v);
                rest = &after[close + 1..];
            }
            None => {
                out.push('{');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// The `{name}` placeholders in a template, in order (for validation to name unknown ones).
pub fn placeholders(template: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        match after.find('}') {
            Some(close) if !after[..close].contains('{') => {
                found.push(&after[..close]);
                rest = &after[close + 1..];
            }
            _ => rest = after,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn well_formed_filters_are_accepted() {
        for f in [
            "#",
            "+",
            "sensors/#",
            "sensors/+/temp",
            "+/+/#",
            "/",
            "a//b",
            "$SYS/#",
            "€/ü",
        ] {
            assert_eq!(valid_filter(f), Ok(()), "{f}");
        }
    }

    #[test]
    fn malformed_filters_are_rejected_with_a_reason() {
        for (f, why) in [
            ("", "empty"),
            ("sensors/#/x", "last level"),
            ("sensors#", "whole level"),
            ("sensors/te+mp", "whole level"),
            ("a/++", "whole level"),
            ("a\0b", "NUL"),
        ] {
            let err = valid_filter(f).expect_err(f);
            assert!(err.contains(why), "{f}: {err}");
        }
        let long = "a".repeat(MAX_LEN + 1);
        assert!(valid_filter(&long).expect_err("too long").contains("65535"));
        assert_eq!(valid_filter(&"a".repeat(MAX_LEN)), Ok(()));
    }

    #[test]
    fn topics_reject_wildcards_and_emptiness() {
        assert_eq!(valid_topic("sensors/temp"), Ok(()));
        assert_eq!(valid_topic("/"), Ok(()));
        assert!(valid_topic("sensors/+").is_err());
        assert!(valid_topic("sensors/#").is_err());
        assert!(valid_topic("").is_err());
        assert!(valid_topic("a\0").is_err());
    }

    #[test]
    fn matching_follows_mqtt_semantics() {
        let yes = [
            ("sensors/#", "sensors"),
            ("sensors/#", "sensors/temp"),
            ("sensors/#", "sensors/a/b/c"),
            ("sensors/+", "sensors/temp"),
            ("sensors/+", "sensors/"),
            ("+/+", "/"),
            ("#", "a"),
            ("#", "/a"),
            ("a/b", "a/b"),
            ("$SYS/#", "$SYS/broker"),
            ("$SYS/+", "$SYS/x"),
            ("a/+/#", "a/b"),
        ];
        let no = [
            ("sensors/+", "sensors"),
            ("sensors/+", "sensors/a/b"),
            ("sensors/temp", "sensors"),
            ("sensors", "sensors/temp"),
            ("#", "$SYS/broker"),
            ("+/broker", "$SYS/broker"),
            ("+", "/"),
            ("a/b", "a/c"),
            ("a/+/#", "a"),
        ];
        for (f, t) in yes {
            assert!(matches(f, t), "{f} should match {t}");
        }
        for (f, t) in no {
            assert!(!matches(f, t), "{f} should not match {t}");
        }
    }

    #[test]
    fn covering_examples_read_as_expected() {
        assert!(covers("sensors/#", "sensors/+/temp"));
        assert!(covers("sensors/#", "sensors"));
        assert!(covers("sensors/#", "sensors/#"));
        assert!(covers("#", "sensors/#"));
        assert!(covers("+/#", "#"), "both match every non-$ topic");
        assert!(
            !covers("sensors/+", "sensors/#"),
            "sensors/# also matches sensors and deeper"
        );
        assert!(!covers("#", "$SYS/#"));
        assert!(!covers("+/temp", "$x/temp"));
        assert!(covers("$SYS/#", "$SYS/broker/+"));
        assert!(!covers("sensors/+/temp", "sensors/#"));
    }

    #[test]
    fn intersection_examples_read_as_expected() {
        assert!(intersects("sensors/+/temp", "sensors/kitchen/#"));
        assert!(intersects("sensors/#", "sensors"));
        assert!(intersects("+/temp", "sensors/#"));
        assert!(!intersects("sensors/#", "cmd/#"));
        assert!(!intersects("#", "$SYS/#"));
        assert!(!intersects("+/x", "$a/x"));
        assert!(intersects("$a/+", "$a/#"));
        assert!(!intersects("a/+", "a"));
        assert!(!intersects("a/+/c", "a/b"));
        assert!(
            !intersects("+", "/#"),
            "only the empty topic would match both"
        );
        assert!(covers("+/+/#", "/#"));
    }

    #[test]
    fn templates_expand_known_placeholders_once() {
        let vars = [("topic", "sensors/{gateway_id}"), ("gateway_id", "gw1")];
        assert_eq!(
            expand("{gateway_id}/{topic}", &vars),
            "gw1/sensors/{gateway_id}"
        );
        assert_eq!(expand("x/{other}/{topic", &vars), "x/{other}/{topic");
        assert_eq!(expand("{{topic}}", &vars), "{sensors/{gateway_id}}");
        assert_eq!(expand("plain", &vars), "plain");
        assert_eq!(placeholders("a/{topic}/{x}/{"), vec!["topic", "x"]);
        assert!(placeholders("none").is_empty());
    }

    #[test]
    fn fixed_prefix_stops_at_the_first_wildcard() {
        assert_eq!(fixed_prefix("edgegate/gw1/cmd/#"), "edgegate/gw1/cmd/");
        assert_eq!(fixed_prefix("a/+/b/#"), "a/");
        assert_eq!(fixed_prefix("#"), "");
        assert_eq!(fixed_prefix("a/b"), "a/b");
    }

    // Small alphabets make collisions (equal levels, `$` levels, empty levels) frequent, and a fresh
    // literal `z` in topics stands for "any other level name".
    const FILTER_LEVELS: [&str; 5] = ["a", "b", "$s", "", "+"];
    const TOPIC_LEVELS: [&str; 5] = ["a", "b", "$s", "", "z"];
    const MAX_FILTER_LEVELS: usize = 3;

    fn filter_strategy() -> impl Strategy<Value = String> {
        (
            prop::collection::vec(
                prop::sample::select(&FILTER_LEVELS[..]),
                0..=MAX_FILTER_LEVELS,
            ),
            any::<bool>(),
        )
            .prop_filter_map("a filter needs a level", |(levels, hash)| {
                let mut levels: Vec<&str> = levels;
                if hash {
                    levels.push("#");
                }
                let filter = levels.join("/");
                (!filter.is_empty()).then_some(filter)
            })
    }

    fn topic_strategy() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop::sample::select(&TOPIC_LEVELS[..]),
            1..=MAX_FILTER_LEVELS + 2,
        )
        .prop_map(|levels| levels.join("/"))
        .prop_filter("a topic cannot be empty", |t| !t.is_empty())
    }

    /// Every topic of up to one level more than the longest generated filter: enough to find a
    /// witness for "b matches but a does not" and for "both match", if one exists.
    fn all_short_topics() -> Vec<String> {
        let mut all = Vec::new();
        let mut current: Vec<String> = TOPIC_LEVELS.iter().map(|s| s.to_string()).collect();
        for _ in 0..MAX_FILTER_LEVELS + 2 {
            all.extend(current.iter().cloned());
            current = current
                .iter()
                .flat_map(|t| TOPIC_LEVELS.iter().map(move |l| format!("{t}/{l}")))
                .collect();
        }
        all.retain(|t| !t.is_empty());
        all
    }

    #[test]
    fn generated_filters_are_valid() {
        let mut runner = proptest::test_runner::TestRunner::default();
        runner
            .run(&filter_strategy(), |f| {
                prop_assert_eq!(valid_filter(&f), Ok(()));
                Ok(())
            })
            .expect("every generated filter is valid");
    }

    proptest! {
        #[test]
        fn a_covering_filter_matches_whatever_the_covered_one_matches(
            a in filter_strategy(), b in filter_strategy(), t in topic_strategy()
        ) {
            if covers(&a, &b) && matches(&b, &t) {
                prop_assert!(matches(&a, &t), "covers({a}, {b}) but {b} matches {t} and {a} does not");
            }
        }

        #[test]
        fn a_topic_matched_by_two_filters_means_they_intersect(
            a in filter_strategy(), b in filter_strategy(), t in topic_strategy()
        ) {
            if matches(&a, &t) && matches(&b, &t) {
                prop_assert!(intersects(&a, &b), "{a} and {b} both match {t}");
            }
        }

        #[test]
        fn covers_and_intersects_agree_with_brute_force(a in filter_strategy(), b in filter_strategy()) {
            let topics = all_short_topics();
            let brute_covers = topics.iter().all(|t| !matches(&b, t) || matches(&a, t));
            let brute_intersects = topics.iter().any(|t| matches(&a, t) && matches(&b, t));
            prop_assert_eq!(covers(&a, &b), brute_covers, "covers({}, {})", a, b);
            prop_assert_eq!(intersects(&a, &b), brute_intersects, "intersects({}, {})", a, b);
        }
    }
}
