/* The logged-in screen: the conversation list, the shown conversation (or
 * the room directory) with its input, and the people beside it: the online
 * users, or a room's members. Files are attached with the attach button, by
 * dropping them on the conversation or pasting them into the input; they
 * upload at once and go with the next message sent there. */
(function (ChatApp, Backbone, _) {
  'use strict';

  var views = ChatApp.views;
  var MAX_FILES = 10; // the server's default CHAT_FILES_PER_MESSAGE; it refuses more anyway

  ChatApp.views.HomeView = Backbone.View.extend({
    className: 'home-screen',
    template: ChatApp.template('home-template'),
    conversationTemplate: ChatApp.template('conversation-template'),
    headerTemplate: ChatApp.template('conversation-header-template'),
    olderTemplate: ChatApp.template('older-template'),
    usersTemplate: ChatApp.template('users-panel-template'),
    membersTemplate: ChatApp.template('members-panel-template'),

    events: {
      'submit #chatForm': 'send',
      'click [data-action="older"]': 'loadOlder',
      'input #chatInput': 'typed',
      'click [data-action="leave"]': 'leave',
      'click [data-action="attach"]': 'chooseFiles',
      'change #fileInput': 'filesChosen',
      'paste #chatInput': 'pasted',
      'dragenter #convPanel': 'dragEnter',
      'dragover #convPanel': 'dragOver',
      'dragleave #convPanel': 'dragLeave',
      'drop #convPanel': 'dropped'
    },

    initialize: function (options) {
      this.vent = options.vent;
      this.conversation = null; // the one shown (null: the directory)
      this.dragDepth = 0;       // dragenter minus dragleave: the drop hint stays while over children
      this.listenTo(this.model, 'change:online', this.renderOnline);
      this.listenTo(this.model, 'change:chatError', this.renderError);
      this.listenTo(this.model, 'change', function () {
        // select() sets both at once: one render.
        if (this.model.hasChanged('active') || this.model.hasChanged('directory')) {
          this.renderMain();
        }
      });
      this.listenTo(this.model, 'unsent', this.restore);
    },

    me: function () {
      var model = this.model;
      return function () { return model.get('me'); };
    },

    render: function () {
      this.removeParts();
      if (this.conversationList) {
        this.conversationList.remove();
      }
      this.$el.html(this.template({}));
      this.conversationList = new views.ConversationListView({
        el: this.$('.conv-side').get(0), model: this.model, vent: this.vent
      }).render();
      this.renderMain();
      return this;
    },

    // The middle and right panels, for the conversation shown (or the directory).
    renderMain: function () {
      if (this.conversation && this.$('#chatInput').length) {
        // Keep what was typed for when this conversation is shown again.
        this.conversation.set('draft', this.$('#chatInput').val());
      }
      this.removeParts();
      var panel = this.$('#convPanel');
      if (this.model.get('directory')) {
        this.conversation = null;
        this.directory = new views.RoomDirectoryView({ model: this.model.directory, home: this.model, vent: this.vent });
        panel.empty().append(this.directory.render().el).attr('aria-label', 'Rooms');
        this.renderPeople(null);
        if (this.el.isConnected) {
          this.directory.shown();
        }
        return;
      }
      var conversation = this.conversation = this.model.activeConversation();
      panel.html(this.conversationTemplate({})).attr('aria-label', conversation.isLobby() ? 'Lobby' : conversation.get('name'));
      this.listenTo(conversation, 'change:name change:topic change:peerOnline', this.renderHeader);
      this.listenTo(conversation, 'change:historyAvailable change:reachedStart change:loadingOlder', this.renderOlder);
      this.chatList = new views.ChatListView({
        el: this.$('#chatList').get(0),
        collection: conversation.chats,
        scroller: this.$('#chatScroll').get(0),
        newBelow: this.$('#newBelow').get(0),
        me: this.me(),
        files: this.model.files,
        showImage: _.bind(this.showImage, this)
      }).render();
      this.tray = new views.UploadTrayView({ el: this.$('#uploadTray').get(0), collection: conversation.uploads }).render();
      this.$('#chatInput').val(conversation.get('draft'));
      this.renderHeader();
      this.renderPeople(conversation);
      this.renderOnline();
      this.renderError();
      this.renderOlder();
      if (this.el.isConnected) {
        this.$('#chatInput').trigger('focus');
      }
    },

    removeParts: function () {
      if (this.conversation) {
        this.stopListening(this.conversation);
      }
      _.invoke(_.compact([this.chatList, this.people, this.directory, this.tray]), 'remove');
      this.chatList = this.people = this.directory = this.tray = null;
      this.dragDepth = 0;
    },

    // A room shows its members; the lobby, a PM and the directory the online users.
    renderPeople: function (conversation) {
      var aside = this.$('#peoplePanel');
      if (conversation && conversation.get('kind') === 'room') {
        aside.html(this.membersTemplate({})).attr('aria-label', 'Members');
        this.people = new views.UserListView({
          el: this.$('#memberList').get(0), collection: conversation.members,
          badge: this.$('#memberCount').get(0), me: this.me(), vent: this.vent, presence: true
        }).render();
      } else {
        aside.html(this.usersTemplate({})).attr('aria-label', 'Online users');
        this.people = new views.UserListView({
          el: this.$('#userList').get(0), collection: this.model.users,
          badge: this.$('#userCount').get(0), me: this.me(), vent: this.vent
        }).render();
      }
    },

    // Called by the container once the view is in the document.
    shown: function () {
      if (this.directory) {
        this.directory.shown();
        return;
      }
      this.chatList.scrollToBottom();
      this.$('#chatInput').trigger('focus');
    },

    renderHeader: function () {
      if (this.conversation) {
        this.$('#convHeader').html(this.headerTemplate(this.conversation.toJSON()));
      }
    },

    renderOnline: function () {
      var online = this.model.get('online');
      this.$el.toggleClass('offline', !online);
      this.$('#chatInput').attr('placeholder', online
        ? 'Type a message and press Enter'
        : 'Not connected: messages can be sent once reconnected');
    },

    renderError: function () {
      this.$('#chatError').text(this.model.get('chatError'));
    },

    renderOlder: function () {
      var conversation = this.conversation;
      if (!conversation) {
        return;
      }
      this.$('#chatOlder').html(this.olderTemplate({
        available: conversation.get('historyAvailable'),
        reachedStart: conversation.get('reachedStart'),
        loading: conversation.get('loadingOlder')
      }));
    },

    send: function (event) {
      event.preventDefault();
      var input = this.$('#chatInput');
      var text = input.val();
      var uploads = this.conversation.uploads;
      var ready = uploads.ready();
      if (uploads.busy()) {
        this.model.set('chatError', 'Wait for the upload to finish, or remove it.');
        return;
      }
      if (!text.trim() && !ready.length) {
        input.val('');
        return;
      }
      if (!this.model.get('online')) {
        this.model.set('chatError', 'Not connected: the message was not sent.');
        return;
      }
      if (ready.length > MAX_FILES) {
        this.model.set('chatError', 'At most ' + MAX_FILES + ' files in one message: remove some.');
        return;
      }
      input.val('');
      this.model.set('chatError', '');
      // Files alone make a message: blank text is then sent empty.
      this.vent.trigger('chat', text.trim() ? text : '', this.conversation, ready);
    },

    // -- attaching files ---------------------------------------------------

    chooseFiles: function () {
      this.$('#fileInput').trigger('click');
    },

    filesChosen: function (event) {
      var input = event.currentTarget;
      var files = _.toArray(input.files);
      input.value = ''; // the same file can be chosen again
      this.attach(files);
    },

    attach: function (files) {
      if (!this.conversation || !files.length) {
        return;
      }
      var room = MAX_FILES - this.conversation.uploads.length;
      if (files.length > room) {
        this.model.set('chatError', 'At most ' + MAX_FILES + ' files in one message.');
        files = files.slice(0, Math.max(0, room));
      } else {
        this.model.set('chatError', '');
      }
      if (files.length) {
        this.vent.trigger('attach', files, this.conversation);
      }
      this.$('#chatInput').trigger('focus');
    },

    // A picture copied to the clipboard (a screenshot) and pasted into the input.
    pasted: function (event) {
      var clipboard = event.originalEvent && event.originalEvent.clipboardData;
      var files = clipboard ? _.toArray(clipboard.files) : [];
      if (files.length) {
        event.preventDefault(); // not its file name as text
        this.attach(files);
      }
    },

    carriesFiles: function (event) {
      var transfer = event.originalEvent && event.originalEvent.dataTransfer;
      return !!transfer && _.contains(_.toArray(transfer.types), 'Files');
    },

    dragEnter: function (event) {
      if (!this.carriesFiles(event) || !this.conversation) {
        return;
      }
      event.preventDefault();
      this.dragDepth += 1;
      this.$('#convPanel').addClass('drop-target');
    },

    dragOver: function (event) {
      if (!this.carriesFiles(event)) {
        return;
      }
      event.preventDefault(); // allows the drop
      event.originalEvent.dataTransfer.dropEffect = this.conversation ? 'copy' : 'none';
    },

    dragLeave: function (event) {
      if (!this.carriesFiles(event) || !this.conversation) {
        return;
      }
      this.dragDepth = Math.max(0, this.dragDepth - 1);
      if (!this.dragDepth) {
        this.$('#convPanel').removeClass('drop-target');
      }
    },

    dropped: function (event) {
      if (!this.carriesFiles(event)) {
        return;
      }
      event.preventDefault(); // not opened by the browser in place of the chat
      this.dragDepth = 0;
      this.$('#convPanel').removeClass('drop-target');
      this.attach(_.toArray(event.originalEvent.dataTransfer.files));
    },

    showImage: function (attachment) {
      new views.LightboxView({ attachment: attachment, files: this.model.files }).open();
    },

    typed: function () {
      if (this.model.get('chatError')) {
        this.model.set('chatError', '');
      }
    },

    // A message the server refused: give it back unless something new was typed.
    restore: function (text, conversation) {
      if (conversation && conversation !== this.conversation) {
        if (!conversation.get('draft')) {
          conversation.set('draft', text);
        }
        return;
      }
      var input = this.$('#chatInput');
      if (!input.val()) {
        input.val(text);
      }
    },

    loadOlder: function () {
      if (this.conversation && !this.conversation.get('loadingOlder')) {
        this.vent.trigger('loadOlder', this.conversation);
      }
    },

    leave: function () {
      if (this.conversation && this.conversation.get('kind') === 'room') {
        this.vent.trigger('leaveRoom', this.conversation);
      }
    },

    remove: function () {
      this.removeParts();
      if (this.conversationList) {
        this.conversationList.remove();
      }
      return Backbone.View.prototype.remove.call(this);
    }
  });
})(ChatApp, Backbone, _);
