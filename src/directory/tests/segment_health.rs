//! `SegmentHealth`, in process: a volume's own segments and a clone's
//! inherited ones are assessed as `volume info` counts them, against the
//! peers as they are now.

use super::*;

impl Fixture {
    async fn segment_health(
        &self,
        volume: &str,
        ids: Vec<SegmentId>,
    ) -> Result<Vec<Option<SegmentHealth>>, Remote> {
        match self.client("client-1", DirRequest::SegmentHealth { volume: volume.into(), ids }).await? {
            DirResponse::SegmentHealth(h) => Ok(h),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn segment_health_follows_the_holders_and_agrees_with_volume_info() {
    // Six peers, two per domain (ids 1 2 | 3 4 | 5 6); vol-1 is k = 2,
    // m = 2: each segment on all three domains, so none is misplaced.
    let f = Fixture::with_peers(6).await;
    f.leased_volume(1).await;
    let mut c = commit_of(1, 1, None, &[1, 2], &[], seg(1, 2));
    c.segments[0].1 = record(&[1, 3, 5, 2], 1);
    c.segments[1].1 = record(&[3, 5, 2, 4], 2);
    f.commit_root("client-1", c).await.unwrap();
    let ids = vec![seg(1, 1), seg(1, 2), seg(1, 9)];
    use SegmentHealth::*;
    assert_eq!(f.segment_health("vol-1", ids.clone()).await.unwrap(), vec![Some(Whole), Some(Whole), None]);

    // peer-0 (id 1) goes silent: segment 1 is degraded, segment 2 is not
    // on it.
    f.pass_time(PEER_TIMEOUT + Duration::from_secs(5), 1..6).await;
    assert_eq!(
        f.segment_health("vol-1", ids.clone()).await.unwrap(),
        vec![Some(Degraded), Some(Whole), None]
    );
    // peer-1 (id 2) too: segment 1 is down to two of four, one failure
    // from unreadable; segment 2 lost one.
    f.pass_time(PEER_TIMEOUT + Duration::from_secs(5), 2..6).await;
    let now = f.segment_health("vol-1", ids.clone()).await.unwrap();
    assert_eq!(now, vec![Some(Critical), Some(Degraded), None]);
    let info = f.volume_info("vol-1").await;
    assert_eq!((info.health.critical, info.health.degraded), (1, 1), "{:?}", info.health);

    // Calls are bounded as SegmentRecords are, and only clients and
    // admins may ask.
    let many = vec![seg(1, 1); MAX_SEGMENTS_PER_CALL + 1];
    assert_eq!(f.segment_health("vol-1", many).await.unwrap_err().kind, ErrorKind::Invalid);
    assert_eq!(f.segment_health("nope", vec![seg(1, 1)]).await.unwrap_err().kind, ErrorKind::NotFound);
    let req = DirRequest::SegmentHealth { volume: "vol-1".into(), ids };
    assert_eq!(f.ask("peer-0", Role::Peer, req).await.unwrap_err().kind, ErrorKind::Refused);
}

#[tokio::test]
async fn a_clones_inherited_segments_are_found_under_the_ancestor_that_wrote_them() {
    let f = Fixture::with_peers(4).await;
    f.leased_volume(1).await;
    let mut c = commit_of(1, 1, None, &[1, 2], &[], seg(1, 2));
    // Segment 2 of the parent has a holder no peer has any more.
    c.segments[1].1 = record(&[1, 2, 3, 9], 2);
    f.commit_root("client-1", c).await.unwrap();
    f.snapshot("vol-1", "s").await.unwrap();
    let p = ("vol-1", "s", 1, seg(1, 2), s_seq(1, 1));
    f.clone_volume(clone_spec("vol-2", 2, &[p]), root_of(2, 1, 1, seg(1, 2), s_seq(1, 1))).await.unwrap();
    assert_eq!(f.acquire("client-1", "vol-2", false).await.unwrap().epoch, 2);
    f.commit_root("client-1", commit_of(2, 2, Some((1, 1)), &[1], &[], seg(2, 1))).await.unwrap();

    use SegmentHealth::*;
    let got = f.segment_health("vol-2", vec![seg(2, 1), seg(1, 1), seg(1, 2), seg(2, 7)]).await.unwrap();
    assert_eq!(got, vec![Some(Whole), Some(Whole), Some(Degraded), None]);
    // The parent sees its own segments the same way.
    assert_eq!(
        f.segment_health("vol-1", vec![seg(1, 2), seg(2, 1)]).await.unwrap(),
        vec![Some(Degraded), None]
    );
}
