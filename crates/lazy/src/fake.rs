//! A fake userfaultfd for unit tests: a `Vec<u8>` memory with per-page presence, a log of
//! every operation, injected events, and injected errors for the next copies.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::Duration;

use nix::errno::Errno;
use torpor_image::pages::PAGE_SIZE;

use crate::uffd::{Event, FillError, Uffd};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Copy(u64, u64),
    Zero(u64, u64),
    Wake(u64, u64),
    Unregister(u64, u64),
}

#[derive(Debug)]
pub struct Mm {
    pub base: u64,
    pub mem: Vec<u8>,
    pub present: Vec<bool>,
    pub ops: Vec<Op>,
    pub events: VecDeque<Event<FakeUffd>>,
    /// Errors the next copies return, with the bytes they copy first.
    pub copy_errors: VecDeque<FillError>,
    /// Events that arrive with the next injected copy error (what the kernel's `EAGAIN`
    /// announces).
    pub events_on_error: VecDeque<Event<FakeUffd>>,
    pub gone: bool,
    pub waits: u32,
}

#[derive(Debug, Clone)]
pub struct FakeUffd(pub Rc<RefCell<Mm>>);

impl FakeUffd {
    pub fn new(base: u64, pages: u64) -> FakeUffd {
        FakeUffd(Rc::new(RefCell::new(Mm {
            base,
            mem: vec![0; (pages * PAGE_SIZE) as usize],
            present: vec![false; pages as usize],
            ops: Vec::new(),
            events: VecDeque::new(),
            copy_errors: VecDeque::new(),
            events_on_error: VecDeque::new(),
            gone: false,
            waits: 0,
        })))
    }

    pub fn push(&self, ev: Event<FakeUffd>) {
        self.0.borrow_mut().events.push_back(ev);
    }

    pub fn ops(&self) -> Vec<Op> {
        self.0.borrow().ops.clone()
    }

    pub fn bytes(&self, addr: u64, len: u64) -> Vec<u8> {
        let mm = self.0.borrow();
        let at = (addr - mm.base) as usize;
        mm.mem[at..at + len as usize].to_vec()
    }

    pub fn set_present(&self, addr: u64) {
        let mut mm = self.0.borrow_mut();
        let i = ((addr - mm.base) / PAGE_SIZE) as usize;
        mm.present[i] = true;
    }
}

impl Mm {
    fn page(&self, addr: u64) -> Option<usize> {
        let i = addr.checked_sub(self.base)? / PAGE_SIZE;
        (i < self.present.len() as u64).then_some(i as usize)
    }

    /// Fills page by page like the kernel: stops at the first present page (`EEXIST`) or at
    /// an address outside the memory (`ENOENT`).
    fn fill(&mut self, dst: u64, src: Option<&[u8]>, len: u64) -> Result<(), FillError> {
        let mut done = 0;
        while done < len {
            let Some(i) = self.page(dst + done) else {
                return Err(FillError {
                    errno: Errno::ENOENT,
                    done,
                });
            };
            if self.present[i] {
                return Err(FillError {
                    errno: Errno::EEXIST,
                    done,
                });
            }
            let at = (dst + done - self.base) as usize;
            let page = &mut self.mem[at..at + PAGE_SIZE as usize];
            match src {
                Some(src) => page.copy_from_slice(&src[done as usize..(done + PAGE_SIZE) as usize]),
                None => page.fill(0),
            }
            self.present[i] = true;
            done += PAGE_SIZE;
        }
        Ok(())
    }
}

impl Uffd for FakeUffd {
    fn copy(&mut self, dst: u64, src: &[u8]) -> Result<(), FillError> {
        let mut mm = self.0.borrow_mut();
        mm.ops.push(Op::Copy(dst, src.len() as u64));
        if mm.gone {
            return Err(FillError {
                errno: Errno::ESRCH,
                done: 0,
            });
        }
        if let Some(err) = mm.copy_errors.pop_front() {
            if err.done > 0 {
                mm.fill(dst, Some(src), err.done)?;
            }
            while let Some(ev) = mm.events_on_error.pop_front() {
                mm.events.push_back(ev);
            }
            return Err(err);
        }
        mm.fill(dst, Some(src), src.len() as u64)
    }

    fn zeropage(&mut self, dst: u64, len: u64) -> Result<(), FillError> {
        let mut mm = self.0.borrow_mut();
        mm.ops.push(Op::Zero(dst, len));
        if mm.gone {
            return Err(FillError {
                errno: Errno::ESRCH,
                done: 0,
            });
        }
        mm.fill(dst, None, len)
    }

    fn wake(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        self.0.borrow_mut().ops.push(Op::Wake(start, len));
        Ok(())
    }

    fn unregister(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        let mut mm = self.0.borrow_mut();
        mm.ops.push(Op::Unregister(start, len));
        if mm.gone {
            return Err(Errno::ENOMEM);
        }
        Ok(())
    }

    fn read_events(&mut self) -> Result<Vec<Event<FakeUffd>>, Errno> {
        Ok(self.0.borrow_mut().events.drain(..).collect())
    }

    fn wait_event(&mut self, _timeout: Duration) {
        self.0.borrow_mut().waits += 1;
    }

    fn mm_alive(&mut self) -> bool {
        !self.0.borrow().gone
    }
}
